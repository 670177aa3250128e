"""The DPO family's loss math beyond DPOP: cDPO, R-DPO, beta-DPO and NPO, as plain tensor functions.

Shapes: `B` is the number of preference pairs. A log-ratio is `rho = log pi(y|x) - log ref(y|x)` summed over the
completion tokens, and `margin = rho_w - rho_l` (chosen minus rejected). Each loss returns per-pair losses `(B,)`.
"""

import torch
import torch.nn.functional as F


def cdpo_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO").

    `loss = -(1 - eps) * log sigmoid(beta * margin) - eps * log sigmoid(-beta * margin)`: DPO's sigmoid loss with the
    preference labels smoothed, as if a fraction `eps` of them were flipped. Unlike DPO, it has a finite minimum, at
    `beta * margin = log((1 - eps) / eps)`, so the margin stops growing. `eps = 0` is DPO's sigmoid loss bit for bit.
    (TRL's `robust` loss also reads `label_smoothing` but is a different, unbiased estimator.)

    Args:
        margin: `(B,)` chosen minus rejected log-ratio.
        beta: inverse temperature, as in DPO.
        label_smoothing: `eps` in [0, 0.5); the DPO authors' code defaults to 0, and values around 0.1 are common.
    """
    losses = -F.logsigmoid(beta * margin)
    if label_smoothing == 0:
        return losses
    return (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * margin)


def rdpo_loss(
    margin: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    """R-DPO (Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization", eq. 9).

    `loss = -log sigmoid(beta * margin + alpha * (|y_w| - |y_l|))`, `|y|` the completion's length in tokens. R-DPO
    maximises the reward minus `alpha * |y|`, so its implicit reward is `beta * rho + alpha * |y|`: a pair whose
    chosen completion is the longer one is already partly explained by length, sits further along the sigmoid and
    pushes the policy less, while a pair that prefers the shorter completion pushes more. The regulariser sits outside
    `beta`. `alpha = 0` is DPO's sigmoid loss bit for bit.

    Args:
        margin: `(B,)` chosen minus rejected log-ratio.
        chosen_lengths, rejected_lengths: `(B,)` completion tokens of each completion.
        beta: inverse temperature, as in DPO.
        alpha: weight of the length regulariser, >= 0. The paper tunes it per setting and gives no single default.
    """
    return -F.logsigmoid(beta * margin + alpha * (chosen_lengths - rejected_lengths))


def npo_loss(rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning").

    `loss = (2 / beta) * log(1 + (pi(y) / ref(y))^beta) = (2 / beta) * softplus(beta * rho)` on the undesired
    response `y` only (here the rejected completion). It lowers `pi(y)`, like gradient ascent on its NLL, but its
    gradient vanishes as `pi(y) / ref(y) -> 0`, so it does not collapse; as `beta -> 0` its gradient tends to that of
    `rho`, i.e. gradient ascent. The paper uses `beta = 0.1`.

    Args:
        rejected_logratios: `(B,)` log-ratio of each undesired completion.
        beta: inverse temperature, > 0.
    """
    return (2 / beta) * F.softplus(beta * rejected_logratios)


def exponential_moving_average(running: torch.Tensor, value: torch.Tensor, momentum: float) -> torch.Tensor:
    """`momentum * running + (1 - momentum) * value`, the update of beta-DPO's running statistics."""
    return momentum * running + (1 - momentum) * value


def beta_dpo_filter_mask(
    margin: torch.Tensor, running_mean: torch.Tensor, running_std: torch.Tensor, filter_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """beta-DPO's data filtering (Wu et al. 2024, "beta-DPO: Direct Preference Optimization with Dynamic beta", sec.
    4.2, as in the authors' code): keeps `int(B * (1 - filter_ratio))` pairs (at least 1), drawn without replacement
    with probability proportional to `exp(-(margin - mean)^2 / (2 * std^2))`, so pairs whose margin is an outlier
    against the running statistics are the likeliest to be dropped. With a zero `running_std` every pair is equally
    likely.

    Args:
        margin: `(B,)` chosen minus rejected log-ratio, without gradient.
        running_mean, running_std: scalars, the running mean and standard deviation of the margin.
        filter_ratio: share of the pairs dropped, in [0, 1); the authors' config drops 0.2. `0` keeps every pair.

    Returns:
        `(B,)` float mask, 1 on the kept pairs.
    """
    if filter_ratio == 0:
        return torch.ones_like(margin)
    if running_std > 0:
        weights = torch.exp(-0.5 * ((margin - running_mean) / running_std) ** 2)
    else:
        weights = torch.ones_like(margin)
    weights = weights.clamp(min=torch.finfo(weights.dtype).tiny)  # multinomial needs a positive total
    kept = max(1, int(margin.numel() * (1 - filter_ratio)))
    mask = torch.zeros_like(margin)
    mask[torch.multinomial(weights, kept, replacement=False, generator=generator)] = 1
    return mask


def beta_dpo_beta(batch_margin_mean: torch.Tensor, running_mean: torch.Tensor, beta0: float, alpha: float):
    """beta-DPO's batch beta, `beta0 * (1 + alpha * (M_batch - M_running))`, clamped at 1e-3 as in the authors'
    code (a negative beta would reverse the preference). `M_batch` is the mean margin of the kept pairs."""
    return (beta0 * (1 + alpha * (batch_margin_mean - running_mean))).clamp(min=1e-3)


def weighted_sigmoid_loss(margin: torch.Tensor, beta: torch.Tensor | float, mask: torch.Tensor) -> torch.Tensor:
    """DPO's sigmoid loss at `beta`, zero off `mask` `(B,)` and scaled so that its mean over the batch is the mean
    over the kept pairs (the authors' `sum(mask * loss) / sum(mask)`)."""
    return -F.logsigmoid(beta * margin) * mask * mask.numel() / mask.sum().clamp(min=1)


def tdpo_loss(
    margin: torch.Tensor, chosen_seq_kl: torch.Tensor, rejected_seq_kl: torch.Tensor, beta: float,
    alpha: float | None = None,
) -> torch.Tensor:
    """TDPO (Zeng et al. 2024, "Token-level Direct Preference Optimization", eqs. 19 and 20, as in the authors' code).

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
