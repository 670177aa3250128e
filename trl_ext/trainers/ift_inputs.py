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


def check_parameters_are_whole(trainer, loss_type: str) -> None:
    """Refuses, before training, the distributed setups whose sharded parameters an extra pass cannot read."""
    deepspeed_plugin = trainer.accelerator.state.deepspeed_plugin
    if trainer.is_fsdp_enabled or (deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3):
        raise ValueError(SHARDED_PARAMETERS_MESSAGE.format(loss_type))


def current_ift_lambda(args, global_step: int) -> float:
    """IFT's mixing weight at optimizer step `global_step`: constant, or a linear ramp from `ift_lambda_min`."""
    if args.ift_lambda_schedule == "constant" or global_step >= args.ift_lambda_warmup_steps:
        return args.ift_lambda
    return args.ift_lambda_min + (args.ift_lambda - args.ift_lambda_min) * global_step / args.ift_lambda_warmup_steps


def predict_next_embeddings(
    unwrapped, inputs, mix_mask: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """IFT's first pass (call it under `no_grad`).

    Args:
        unwrapped: the causal LM (or the PEFT model around it), outside any distributed wrapper.
        inputs: the batch (`input_ids` `(B, T)`, and `attention_mask` or padding-free `position_ids`).
        mix_mask: `(B, T)` bool, True at the positions whose input is mixed; each is predicted from the position before.
        prediction: `"greedy"` (the argmax token's embedding) or `"soft"` (the probability-weighted embedding).

    Returns:
        The predicted embedding at each masked position `(B, T, H)` and the teacher-forced NLL of its token `(B, T)`,
        both zero elsewhere. The backbone runs once and the LM head only on the positions feeding a prediction, in
        chunks of `PREDICTION_CHUNK`, so no `(B, T, vocab)` logits exist.
    """
    causal_lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
    backbone_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
    hidden = causal_lm.base_model(**backbone_inputs, use_cache=False).last_hidden_state
    lm_head = causal_lm.get_output_embeddings()
    embedding_matrix = unwrapped.get_input_embeddings().weight
    source_hidden = hidden[:, :-1][mix_mask[:, 1:]]  # the position before each masked one
    targets = inputs["input_ids"][mix_mask]
    predicted, nll = [], []
    for start in range(0, source_hidden.size(0), PREDICTION_CHUNK):
        logits = lm_head(source_hidden[start : start + PREDICTION_CHUNK])
        log_probs = logits.float().log_softmax(dim=-1)
        nll.append(-log_probs.gather(1, targets[start : start + PREDICTION_CHUNK].unsqueeze(1)).squeeze(1))
        if prediction == "greedy":
            predicted.append(embedding_matrix[logits.argmax(dim=-1)])
        else:
            predicted.append(log_probs.exp().to(embedding_matrix.dtype) @ embedding_matrix)
    predicted_embeds = hidden.new_zeros(*mix_mask.shape, embedding_matrix.size(1), dtype=embedding_matrix.dtype)
    token_nll = hidden.new_zeros(mix_mask.shape, dtype=torch.float32)
    if predicted:
        predicted_embeds[mix_mask] = torch.cat(predicted)
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
