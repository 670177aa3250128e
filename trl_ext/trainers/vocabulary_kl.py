"""The per-position KL over the vocabulary that losses registered with `vocabulary_kl=True` (TDPO) read, from the
hidden states of TRL's own forwards.

TRL's fused LM head returns only the label's log-prob (no logits), so the trainer records the last hidden state of
the same policy and reference forwards (`trl_contract.record_last_hidden_states`) and applies each model's LM head
again at the completion positions only, in chunks (`trl_ext.losses.tdpo.sequential_kl`).
"""

import torch
from accelerate.utils import is_peft_model

from ..losses.tdpo import sequential_kl
from ..trl_contract import TRLContractError, use_adapter

# Positions whose (positions x vocabulary) logits exist at once, per model
KL_CHUNK = 256
# Logit transforms TRL's fused head applies and a bare LM head does not
UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                                "logits_scaling")


def check_plain_lm_head(model, loss_types: list[str]) -> None:
    """Refuses, before training, models whose logits are not their LM head's output (the KL would be off)."""
    config = model.config.get_text_config()
    transforms = [name for name in UNSUPPORTED_LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1.0)]
    if transforms:
        raise ValueError(
            f"`loss_type` {loss_types} computes the KL over the vocabulary from the LM head's logits, but this model "
            f"also transforms them ({', '.join(transforms)}); use another loss type."
        )


def token_kls(trainer, inputs, hidden_states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`KL(ref || pi)` at each completion position of the chosen and of the rejected rows, `(B, T)` each, from the
    recorded last hidden states of the policy and reference forwards."""
    if len(hidden_states) != 2:
        raise TRLContractError(
            f"trl.DPOTrainer._compute_loss was expected to run the policy's and the reference's backbones once each, "
            f"but {len(hidden_states)} backbone forward(s) were recorded."
        )
    mask = inputs["completion_mask"][:, 1:].bool()
    seq_len = mask.size(1)
    # As in TRL's fused head: position t predicts token t + 1; prompt-learning PEFT's virtual tokens come first
    policy_hidden, ref_hidden = (hidden[:, :-1][:, -seq_len:][mask] for hidden in hidden_states)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    policy_head = unwrapped.get_output_embeddings()
    if trainer.ref_model is not None:
        ref_head = trainer.accelerator.unwrap_model(trainer.ref_model).get_output_embeddings()
    else:  # the policy with its adapter disabled, or the starting adapter kept as "ref", as TRL runs it

        def ref_head(hidden):
            adapter = "ref" if is_peft_model(unwrapped) and "ref" in unwrapped.peft_config else None
            with use_adapter(unwrapped, adapter_name=adapter):
                return policy_head(hidden)

    kl = sequential_kl(policy_hidden, ref_hidden.to(policy_hidden.dtype), policy_head, ref_head, KL_CHUNK)
    return kl.new_zeros(mask.shape).masked_scatter(mask, kl).chunk(2)

