"""IFT's first pass, for losses registered with `ift_inputs=True` (Intuitive Fine-Tuning, Hua et al. 2024).

Pass 1, without gradient, predicts every completion token from its prefix. Its prediction's embedding is mixed into
the next input (the temporal residual connection). Pass 2 is TRL's own forward on the mixed inputs, whose per-token
log-probs the registered loss (`trl_ext.losses.ift`) weights by relation propagation.
"""

from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from ..losses.ift import ift_mix_embeddings
from ..trl_contract import disable_gradient_checkpointing
from .packed import rows_per_sequence

# Rows of (positions x vocabulary) logits the first pass holds at once
PREDICTION_CHUNK = 256
SHARDED_PARAMETERS_MESSAGE = (
    "`loss_type='{}'` does not support FSDP or DeepSpeed ZeRO-3: it runs a pass outside the model's forward (IFT's "
    "first pass reads the embedding matrix and runs the backbone and LM head), where these keep the parameters "
    "sharded. Use DDP (`distributed_type: MULTI_GPU` in the accelerate config) or DeepSpeed ZeRO-2 (`zero_stage: 2`)."
)


def check_first_pass_can_run(trainer, loss_type: str) -> None:
    """Refuses, before training, the distributed setups whose sharded parameters an extra pass cannot read, and
    `ift_prediction="soft"` with an embedding layer whose output is not its weight's rows."""
    deepspeed_plugin = trainer.accelerator.state.deepspeed_plugin
    if trainer.is_fsdp_enabled or (deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3):
        raise ValueError(SHARDED_PARAMETERS_MESSAGE.format(loss_type))
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    embedding = unwrapped.get_input_embeddings()
    if trainer.args.ift_prediction == "soft" and soft_embedding(unwrapped) is None:
        raise ValueError(
            f"`ift_prediction='soft'` weights the rows of the embedding matrix, but this model's embedding layer is "
            f"`{type(embedding).__module__}.{type(embedding).__qualname__}` (an adapter or trainable tokens on the "
            "embeddings?), whose output is not those rows: use `ift_prediction='greedy'`, or leave the embeddings out "
            "of the adapter's `target_modules`."
        )


def current_ift_lambda(args, global_step: int) -> float:
    """IFT's mixing weight at optimizer step `global_step`: constant, or a linear ramp from `ift_lambda_min`."""
    if args.ift_lambda_schedule == "constant" or global_step >= args.ift_lambda_warmup_steps:
        return args.ift_lambda
    return args.ift_lambda_min + (args.ift_lambda - args.ift_lambda_min) * global_step / args.ift_lambda_warmup_steps


def next_token_logits(causal_lm, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model's own forward computes from its last hidden states `(N, H)`: the LM head, then the scale
    and the soft cap its config declares (as TRL's fused head reads them: `logit_scale`, `output_multiplier`,
    `lm_head_multiplier` or `logits_scaling`; `final_logit_softcapping`, e.g. Gemma 2 and 3)."""
    config = causal_lm.config.get_text_config()
    logits = causal_lm.get_output_embeddings()(hidden)
    scale = next((getattr(config, name) for name in ("logit_scale", "output_multiplier", "lm_head_multiplier")
                  if getattr(config, name, None) is not None), None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    if scale is not None:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else cap * torch.tanh(logits / cap)


def soft_embedding(unwrapped) -> tuple[torch.Tensor, torch.Tensor | float] | None:
    """`(weight, scale)`: the input embedding of a probability-weighted token is `(probs @ weight) * scale` (Gemma
    scales its embeddings; the scale is applied to the product, not to a copy of the matrix); `None` for a layer whose
    output is not its weight's rows (a PEFT adapter or trainable tokens on the embeddings)."""
    embedding = unwrapped.get_input_embeddings()
    if not isinstance(embedding, torch.nn.Embedding):
        return None
    scale = getattr(embedding, "embed_scale", None)
    return embedding.weight, 1.0 if scale is None else scale.to(embedding.weight.dtype)


def predict_next_embeddings(
    unwrapped, inputs, mix_mask: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """IFT's first pass (call it under `no_grad`).

    Args:
        unwrapped: the causal LM (or the PEFT model around it), outside any distributed wrapper.
        inputs: the batch (`input_ids` `(B, T)`, and `attention_mask` or padding-free `position_ids`).
        mix_mask: `(B, T)` bool, True at the positions whose input is mixed; each is predicted from the position before.
        prediction: `"greedy"` (the argmax token's embedding, from the embedding layer) or `"soft"` (the
            probability-weighted embedding, see [`soft_embedding`]).

    Returns:
        The predicted embedding at each masked position `(B, T, H)` and the teacher-forced NLL of its token `(B, T)`,
        both zero elsewhere. The backbone runs once and the LM head only on the positions feeding a prediction, in
        chunks of `PREDICTION_CHUNK`, so no `(B, T, vocab)` logits exist.
    """
    causal_lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
    backbone_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
    hidden = causal_lm.base_model(**backbone_inputs, use_cache=False).last_hidden_state
    embedding = unwrapped.get_input_embeddings()
    weight, scale = soft_embedding(unwrapped) if prediction == "soft" else (None, None)
    source_hidden = hidden[:, :-1][mix_mask[:, 1:]]  # the position before each masked one
    targets = inputs["input_ids"][mix_mask]
    predicted, nll = [], []
    for start in range(0, source_hidden.size(0), PREDICTION_CHUNK):
        logits = next_token_logits(causal_lm, source_hidden[start : start + PREDICTION_CHUNK])
        log_probs = logits.float().log_softmax(dim=-1)
        nll.append(-log_probs.gather(1, targets[start : start + PREDICTION_CHUNK].unsqueeze(1)).squeeze(1))
        if prediction == "greedy":
            predicted.append(embedding(logits.argmax(dim=-1)))
        else:
            predicted.append((log_probs.exp().to(weight.dtype) @ weight) * scale)
    predicted_embeds = hidden.new_zeros(*mix_mask.shape, embedding.weight.size(1), dtype=embedding.weight.dtype)
    token_nll = hidden.new_zeros(mix_mask.shape, dtype=torch.float32)
    if predicted:
        predicted_embeds[mix_mask] = torch.cat(predicted).to(predicted_embeds.dtype)
        token_nll[mix_mask] = torch.cat(nll)
    return predicted_embeds, token_nll


@dataclass(frozen=True)
class IFTInputs:
    """What IFT's first pass makes of a batch: the inputs of TRL's forward (the ground-truth embeddings mixed with the
    predicted ones at `ift_lambda`), and the teacher-forced NLL of each mixed position, as per-sequence rows with their
    mask (`trl_ext.losses.SFTLogps.teacher_forced_*`)."""

    mixed_inputs: dict
    teacher_forced_token_nll: torch.Tensor
    teacher_forced_mask: torch.Tensor
    ift_lambda: float


def ift_inputs(model, unwrapped, inputs: dict, args, global_step: int) -> IFTInputs:
    """Runs IFT's first pass on `inputs` (without gradient, checkpointing off) and mixes its predictions in.

    Every target position but a row's first gets a mixed input. Its prediction comes from the previous position,
    which then lies in the same sequence (TRL's padding-free collator already ignores the label of each packed
    sequence's first token). The first completion token is mixed too, predicted from the prompt's last token.
    """
    if isinstance(model, FullyShardedDataParallel) or isinstance(unwrapped, FSDPModule):  # wrapped after start-up
        raise ValueError(SHARDED_PARAMETERS_MESSAGE.format("ift"))
    mix_mask = inputs["labels"] != -100
    mix_mask[:, 0] = False
    ift_lambda = current_ift_lambda(args, global_step)
    with torch.no_grad(), disable_gradient_checkpointing(model, args.gradient_checkpointing_kwargs):
        predicted_embeds, teacher_forced_nll = predict_next_embeddings(unwrapped, inputs, mix_mask, args.ift_prediction)
    teacher_forced_mask, teacher_forced_nll = rows_per_sequence(inputs, mix_mask, teacher_forced_nll, shifted=False)
    token_embeds = unwrapped.get_input_embeddings()(inputs["input_ids"])
    mixed_inputs = {key: value for key, value in inputs.items() if key != "input_ids"}
    mixed_inputs["inputs_embeds"] = ift_mix_embeddings(token_embeds, predicted_embeds, mix_mask, ift_lambda)
    return IFTInputs(mixed_inputs, teacher_forced_nll, teacher_forced_mask, ift_lambda)
