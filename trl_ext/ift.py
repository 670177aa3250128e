"""IFT's two passes (Intuitive Fine-Tuning, Hua et al. 2024) on top of `trl.SFTTrainer.compute_loss`.

Pass 1, without gradient, predicts every completion token from its prefix. Its prediction's embedding is mixed into
the next input (the temporal residual connection). Pass 2 is TRL's own forward on the mixed inputs; its per-token
NLL, weighted by relation propagation, is the loss.
"""

import torch
from accelerate.utils import is_peft_model
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from . import citations, losses
from .packed import rows_per_sequence
from .sft_losses import register_sft_loss
from .trl_contract import disable_gradient_checkpointing

# Rows of (positions x vocabulary) logits the first pass holds at once
PREDICTION_CHUNK = 256
SHARDED_PARAMETERS_MESSAGE = (
    "`loss_type='{}'` does not support FSDP or DeepSpeed ZeRO-3: it runs a pass outside the model's forward (IFT's "
    "first pass reads the embedding matrix and runs the backbone and LM head), where these keep the parameters "
    "sharded. Use DDP (`accelerate_configs/multi_gpu.yaml`) or ZeRO-2 (`accelerate_configs/deepspeed_zero2.yaml`)."
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


@register_sft_loss("ift", extra_pass=True, citation=citations.IFT)
def ift_compute_loss(trainer, model, inputs, return_outputs: bool, num_items_in_batch):
    """IFT's loss for `trl_ext.SFTTrainer.compute_loss`: both passes, the relation-propagation loss, and its metrics."""
    # Every target position but a row's first gets a mixed input. Its prediction comes from the previous position,
    # which then lies in the same sequence (TRL's padding-free collator already ignores the label of each packed
    # sequence's first token). The first completion token is mixed too, predicted from the prompt's last token.
    mix_mask = inputs["labels"] != -100
    mix_mask[:, 0] = False
    ift_lambda = current_ift_lambda(trainer.args, trainer.state.global_step)
    unwrapped = trainer.accelerator.unwrap_model(model)
    if isinstance(model, FullyShardedDataParallel) or isinstance(unwrapped, FSDPModule):  # wrapped after start-up
        raise ValueError(SHARDED_PARAMETERS_MESSAGE.format("ift"))

    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        predicted_embeds, teacher_forced_nll = predict_next_embeddings(
            unwrapped, inputs, mix_mask, trainer.args.ift_prediction
        )
    teacher_forced_mask, teacher_forced_nll = rows_per_sequence(inputs, mix_mask, teacher_forced_nll, shifted=False)
    token_embeds = unwrapped.get_input_embeddings()(inputs["input_ids"])
    mixed_inputs = {key: value for key, value in inputs.items() if key != "input_ids"}
    mixed_inputs["inputs_embeds"] = losses.ift_mix_embeddings(token_embeds, predicted_embeds, mix_mask, ift_lambda)

    # TRL's forward on the mixed inputs gives the per-token log-probs and its own metrics; IFT replaces its loss.
    result, fused_output = trainer.trl_compute_loss(model, mixed_inputs, return_outputs, num_items_in_batch)
    mask, token_nll = rows_per_sequence(inputs, fused_output.label_mask, -fused_output.log_probs)
    per_sequence = losses.ift_loss(token_nll, mask, trainer.args.ift_gamma, trainer.args.ift_detach_weights)
    loss = trainer.batch_mean(per_sequence) / trainer.accumulation_divisor(num_items_in_batch)
    trainer.log_means({
        "ift/lambda": torch.tensor([ift_lambda], device=mask.device),
        "ift/nll_teacher_forced": losses.sequence_mean(teacher_forced_nll, teacher_forced_mask),
        "ift/nll_mixed": losses.sequence_mean(token_nll, mask),
    })
    return (loss, result[1]) if return_outputs else loss
