"""Loss functions as plain tensor math, independent of any trainer.

Every function here takes per-sequence (or per-token) tensors and returns per-sequence losses, so the trainers only
gather inputs and reduce. Shapes: `B` is the number of preference pairs (or sequences) in the batch.
"""

import torch
import torch.nn.functional as F


def dpop_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    dpop_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228, eq. 3 of the July 2024 revision).

    `loss = -log sigmoid(beta * (rho_w - rho_l - lambda * max(0, -rho_w)))` with `rho = log pi(y|x) - log ref(y|x)`.

    The penalty sits inside the sigmoid, scaled by `beta`. It is on only while the chosen log-ratio is negative, i.e.
    while the policy has made the preferred completion less likely than the reference did: plain DPO can lower the
    loss by pushing both completions down, DPOP cannot. With `dpop_lambda=0` this is DPO's sigmoid loss, bit for bit.

    Args:
        chosen_logratios: `(B,)` policy minus reference log-probability of each chosen completion.
        rejected_logratios: `(B,)` the same for each rejected completion.
        beta: inverse temperature of the implicit reward, as in DPO.
        dpop_lambda: weight of the penalty, `>= 0`. The paper uses 50 and finds results insensitive in [5, 500].

    Returns:
        `(losses, penalty)`, both `(B,)`: the per-pair loss and the per-pair penalty `dpop_lambda * max(0, -rho_w)`.
    """
    penalty = dpop_lambda * torch.relu(-chosen_logratios)
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios - penalty))
    return losses, penalty


def sequence_mean(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of `token_values` `(B, T)` over the positions where `mask` `(B, T)` is 1; `(B,)`."""
    mask = mask.to(token_values.dtype)
    return (token_values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def unpack_sequences(token_values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Splits one row of sequences laid end to end (a padding-free batch) into a right-padded row per sequence.

    Args:
        token_values: `(1, N)` per-token values.
        offsets: `(S + 1,)` sequence `k` spans `[offsets[k], offsets[k + 1])`; `offsets[-1] == N`.

    Returns:
        `(S, L)`, `L` the longest sequence, zero (False) after each sequence's end. Differentiable.
    """
    rows = torch.split(token_values[0], offsets.diff().tolist())
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def sq_logratio_penalty(
    policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """KL-SFT's penalty in the Penn experiment: `(avg_logp_policy(y) - avg_logp_ref(y))^2` per sequence.

    A pseudo-KL on per-token averaged sequence log-probs that penalises drift in both directions.

    Args:
        policy_token_logps: `(B, T)` log-probability of each target token under the policy.
        ref_token_logps: `(B, T)` the same under the frozen reference.
        mask: `(B, T)` 1 on target (completion) tokens, 0 elsewhere.

    Returns:
        `(B,)` per-sequence penalty.
    """
    return (sequence_mean(policy_token_logps, mask) - sequence_mean(ref_token_logps, mask)) ** 2


def token_kl_penalty(policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token reverse-KL estimate `k3 = exp(r) - r - 1`, `r = logp_ref - logp_policy`, averaged per sequence.

    `k3` is non-negative, unbiased for `KL(policy || ref)` when tokens are sampled from the policy, and has lower
    variance than `-r`; here it is evaluated on the target tokens. Shapes as in [`sq_logratio_penalty`].
    """
    log_ratio = ref_token_logps - policy_token_logps
    return sequence_mean(torch.exp(log_ratio) - log_ratio - 1, mask)


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
