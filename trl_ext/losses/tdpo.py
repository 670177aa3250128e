"""TDPO (Zeng et al. 2024, "Token-level Direct Preference Optimization"): `tdpo1`, `tdpo2`, DPO with the sequential
KL to the reference over the vocabulary (which the trainer computes, see `trl_ext.trainers.vocabulary_kl`)."""

import torch
import torch.nn.functional as F

from ..citations import arxiv_citation
from .inputs import PreferenceLogps, PreferenceLossOutput
from .registry import check_finite_at_least, register_dpo_loss

PAPER = arxiv_citation("zeng2024token", "Token-level Direct Preference Optimization", "Zeng, Yongcheng", 2024,
                       "2404.11999")


def tdpo_loss(
    margin: torch.Tensor, chosen_seq_kl: torch.Tensor, rejected_seq_kl: torch.Tensor, beta: float,
    alpha: float | None = None,
) -> torch.Tensor:
    """TDPO's eqs. 19 and 20, as in the authors' code.

    TDPO1 (`alpha=None`): `-log sigmoid(beta * (margin - (D_l - D_w)))`; TDPO2: `-log sigmoid(beta * (margin -
    alpha * (D_l - sg(D_w))))`, with `D` the sequential KL `sum_t KL(ref(.|x, y_<t) || pi(.|x, y_<t))` over the
    completion and `sg` a stop-gradient. The KL term is inside `beta`, as in the authors' code. TDPO2's stop-gradient
    on the chosen KL lets the rejected KL grow while the chosen one is held; the authors use `alpha = 0.5`.

    Args:
        margin: `(B,)` chosen minus rejected log-ratio.
        chosen_seq_kl, rejected_seq_kl: `(B,)` sequential KL of each completion ([`sequential_kl`] summed).
        beta: inverse temperature, as in DPO (the authors use 0.1).
        alpha: TDPO2's weight of the KL term; `None` for TDPO1.
    """
    if alpha is None:
        return -F.logsigmoid(beta * (margin - (rejected_seq_kl - chosen_seq_kl)))
    return -F.logsigmoid(beta * (margin - alpha * (rejected_seq_kl - chosen_seq_kl.detach())))


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """`KL(ref || pi)` of the next-token distributions, `(n, V)` logits each, in float32; `(n,)`."""
    ref_log_probs = ref_logits.float().log_softmax(-1)
    return (ref_log_probs.exp() * (ref_log_probs - policy_logits.float().log_softmax(-1))).sum(-1)


def sequential_kl(
    policy_hidden: torch.Tensor, ref_hidden: torch.Tensor, policy_head, ref_head, chunk_size: int = 256
) -> torch.Tensor:
    """Per-position `KL(ref || pi)` over the vocabulary from the two models' last hidden states, `chunk_size`
    positions at a time.

    Only `(chunk_size, V)` logits exist at once: each chunk's policy logits are recomputed in the backward pass
    (activation checkpointing) instead of being kept, so memory does not grow with the number of positions.

    Args:
        policy_hidden: `(N, H)` hidden states of the policy at the positions that predict a completion token.
        ref_hidden: `(N, H)` the same for the reference, without gradient.
        policy_head, ref_head: callables mapping `(n, H)` hidden states to `(n, V)` logits (the LM heads).

    Returns:
        `(N,)` KL at each position, differentiable through `policy_hidden` and `policy_head`.
    """

    def chunk_kl(policy_chunk: torch.Tensor, ref_chunk: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref_logits = ref_head(ref_chunk)
        return token_kl(policy_head(policy_chunk), ref_logits)

    kls = [
        torch.utils.checkpoint.checkpoint(chunk_kl, policy_hidden[start: start + chunk_size],
                                          ref_hidden[start: start + chunk_size], use_reentrant=False)
        for start in range(0, policy_hidden.size(0), chunk_size)
    ]
    return torch.cat(kls) if kls else policy_hidden.new_zeros(0)


def _tdpo_output(batch: PreferenceLogps, config, alpha: float | None) -> PreferenceLossOutput:
    chosen_kl = (batch.chosen_token_kl * batch.chosen_mask).sum(1)
    rejected_kl = (batch.rejected_token_kl * batch.rejected_mask).sum(1)
    losses = tdpo_loss(batch.margins, chosen_kl, rejected_kl, config.beta, alpha)
    return PreferenceLossOutput(losses, {"kl_chosen": chosen_kl.detach(), "kl_rejected": rejected_kl.detach()})


@register_dpo_loss("tdpo1", citation=PAPER, vocabulary_kl=True)
def tdpo1(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """TDPO1: DPO's margin minus the difference of the sequential KLs of the rejected and chosen completions."""
    return _tdpo_output(batch, config, alpha=None)


@register_dpo_loss("tdpo2", citation=PAPER, vocabulary_kl=True,
                   validate=lambda config: check_finite_at_least(config, "tdpo_alpha"))
def tdpo2(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """TDPO2: the KL difference weighted by `tdpo_alpha`, the chosen completion's KL without gradient."""
    return _tdpo_output(batch, config, alpha=config.tdpo_alpha)
