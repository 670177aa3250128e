"""IFT, Intuitive Fine-Tuning (Hua et al. 2024, arXiv 2405.11870): `ift`, learning the ground truth from inputs mixed
with the model's own one-step predictions (the passes that build them: `trl_ext.trainers.ift_inputs`), each token
weighted by the discounted losses of the tokens after it (relation propagation)."""

import torch

from ..citations import arxiv_citation
from .inputs import SFTLogps, SFTLossOutput, sequence_mean
from .registry import register_sft_loss

PAPER = arxiv_citation("hua2024intuitive",
                       "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single Process", "Hua, Ermo",
                       2024, "2405.11870")


def ift_mix_embeddings(
    token_embeds: torch.Tensor, predicted_embeds: torch.Tensor, mix_mask: torch.Tensor, ift_lambda: float
) -> torch.Tensor:
    """IFT's temporal residual connection: `(1 - lambda) * E[x_i] + lambda * E_pred[i]` where `mix_mask` is set.

    Args:
        token_embeds: `(B, T, H)` embeddings of the ground-truth tokens.
        predicted_embeds: `(B, T, H)` embedding of the model's prediction for each position (from position i - 1).
        mix_mask: `(B, T)` bool, True at completion positions other than the first of a sequence.
        ift_lambda: mixing weight in [0, 1].

    Returns:
        `(B, T, H)` input embeddings, equal to `token_embeds` wherever `mix_mask` is False.
    """
    mixed = torch.lerp(token_embeds, predicted_embeds.to(token_embeds.dtype), ift_lambda)
    return torch.where(mix_mask.unsqueeze(-1), mixed, token_embeds)


def relation_propagation_weights(token_nll: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """IFT's relation-propagation weights (official defaults: type `loss`, side `left`, norm `L1`).

    `r_t = sum_{j >= t} gamma^(j - t) * c_j` with `c_j = nll_j / n` on the `n` target tokens of the sequence, and
    `w_t = r_t * n / sum_t r_t`, so the weights average 1 over each sequence. A token's weight grows with the losses
    of the tokens after it: an early mistake is charged for what it leads to. `gamma = 0` gives all-ones weights, as
    in the official code (not the limit of the formula). Gradient flows through the weights unless the caller
    detaches `token_nll`. Builds a `(T, T)` matrix of discounts: O(T^2) memory, shared across the batch.

    Args:
        token_nll: `(B, T)` per-token negative log-likelihood.
        mask: `(B, T)` 1 on target tokens.
        gamma: discount in [0, 1].

    Returns:
        `(B, T)` weights, 0 off the target tokens.
    """
    mask = mask.to(token_nll.dtype)
    if gamma == 0:
        return mask
    positions = torch.arange(token_nll.size(1), device=token_nll.device)
    offsets = positions.unsqueeze(0) - positions.unsqueeze(1)  # [t, j] = j - t
    discounts = torch.where(offsets >= 0, gamma ** offsets.clamp(min=0).to(token_nll.dtype), 0.0)
    num_tokens = mask.sum(dim=1, keepdim=True).clamp(min=1)
    contributions = token_nll * mask / num_tokens
    propagated = (contributions @ discounts.T) * mask  # [b, t] = sum_j discounts[t, j] * contributions[b, j]
    return propagated * num_tokens / propagated.sum(dim=1, keepdim=True).clamp(min=torch.finfo(token_nll.dtype).tiny)


def ift_loss(token_nll: torch.Tensor, mask: torch.Tensor, gamma: float, detach_weights: bool = False) -> torch.Tensor:
    """IFT's per-sequence loss `sum_t w_t * nll_t / n` with relation-propagation weights `w`.

    With `gamma = 0` it is the per-sequence mean NLL. Shapes as in [`relation_propagation_weights`]; returns `(B,)`.
    The official code does not detach the weights (`detach_weights=False`).
    """
    weights = relation_propagation_weights(token_nll.detach() if detach_weights else token_nll, mask, gamma)
    return sequence_mean(weights * token_nll, mask)


@register_sft_loss("ift", citation=PAPER, ift_inputs=True, replaces_nll=True)
def ift(batch: SFTLogps, config) -> SFTLossOutput:
    """IFT's relation-propagation loss on the NLL of the mixed inputs, in place of TRL's NLL."""
    token_nll = -batch.policy_token_logps
    return SFTLossOutput(ift_loss(token_nll, batch.mask, config.ift_gamma, config.ift_detach_weights), {
        "ift/nll_teacher_forced": sequence_mean(batch.teacher_forced_token_nll, batch.teacher_forced_mask),
        "ift/nll_mixed": sequence_mean(token_nll, batch.mask),
    })
