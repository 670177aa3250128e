"""beta-DPO (Wu et al. 2024, "beta-DPO: Direct Preference Optimization with Dynamic beta", as in the authors' code):
`beta_dpo`, a per-batch beta and outlier pairs filtered, with running margin statistics kept in checkpoints."""

import torch
import torch.nn.functional as F

from ..citations import arxiv_citation
from .inputs import PreferenceLogps, PreferenceLossOutput
from .registry import check_finite_at_least, register_dpo_loss

PAPER = arxiv_citation("wu2024betadpo", "beta-DPO: Direct Preference Optimization with Dynamic beta", "Wu, Junkang",
                       2024, "2407.08639")


def exponential_moving_average(running: torch.Tensor, value: torch.Tensor, momentum: float) -> torch.Tensor:
    """`momentum * running + (1 - momentum) * value`, the update of beta-DPO's running statistics."""
    return momentum * running + (1 - momentum) * value


def beta_dpo_filter_mask(
    margin: torch.Tensor, running_mean: torch.Tensor, running_std: torch.Tensor, filter_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """beta-DPO's data filtering (sec. 4.2, as in the authors' code): keeps `int(B * (1 - filter_ratio))` pairs (at
    least 1), drawn without replacement with probability proportional to `exp(-(margin - mean)^2 / (2 * std^2))`, so
    pairs whose margin is an outlier against the running statistics are the likeliest to be dropped. With a zero
    `running_std` every pair is equally likely.

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


def weighted_sigmoid_loss(margin: torch.Tensor, beta: torch.Tensor | float, mask: torch.Tensor,
                          kept_share: torch.Tensor | float) -> torch.Tensor:
    """DPO's sigmoid loss at `beta`, zero off `mask` `(B,)` and divided by `kept_share`, the share of pairs kept over
    every process: the mean over the batch, averaged over the processes as DDP averages their gradients, is then the
    mean over the kept pairs (the authors' `sum(mask * loss) / sum(mask)`)."""
    return -F.logsigmoid(beta * margin) * mask / kept_share


def _check_beta_dpo(config) -> None:
    check_finite_at_least(config, "beta_dpo_alpha")
    if not 0 <= config.beta_dpo_momentum < 1:
        raise ValueError(f"`beta_dpo_momentum` must be in [0, 1), got {config.beta_dpo_momentum}.")
    if not 0 <= config.beta_dpo_filter_ratio < 1:
        raise ValueError(
            "`beta_dpo_filter_ratio` must be in [0, 1) (the share of pairs dropped), got "
            f"{config.beta_dpo_filter_ratio}."
        )


@register_dpo_loss("beta_dpo", citation=PAPER, stateful=True, validate=_check_beta_dpo)
def beta_dpo(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """beta-DPO as in the authors' code: in training, the running mean and standard deviation of the margin (over
    every process's pairs; zero at the start) first take in this batch; then `beta_dpo_filter_ratio` of the pairs
    of every process together are dropped, preferring outliers (one draw, the same on every process, seeded by the
    count of draws kept in the state: a resumed run draws as the uninterrupted one); the batch beta is `beta * (1 +
    beta_dpo_alpha * (mean kept margin - running mean))`, without gradient. Evaluation uses the running statistics
    without updating them and keeps every pair, so its loss is repeatable (the authors' code updates the statistics
    and filters on evaluation batches too)."""
    margin = batch.margins.detach()
    context = batch.context
    state = context.state
    gathered = context.gather(margin)  # every process's pairs: one gather serves the statistics, draw and beta
    kept = torch.ones_like(gathered)
    if context.training:
        std = gathered.std() if gathered.numel() > 1 else gathered.new_zeros(())
        momentum = config.beta_dpo_momentum
        state["running_mean"] = exponential_moving_average(state.get("running_mean", 0.0), gathered.mean(), momentum)
        state["running_std"] = exponential_moving_average(state.get("running_std", 0.0), std, momentum)
        state["draws"] = state.get("draws", gathered.new_zeros((), dtype=torch.long)) + 1
        generator = torch.Generator(device=gathered.device).manual_seed(int(state["draws"]))
        kept = beta_dpo_filter_mask(gathered, state["running_mean"], state["running_std"],
                                    config.beta_dpo_filter_ratio, generator)
    mask = kept.view(-1, margin.numel())[context.process_index]
    running_mean = state.get("running_mean", margin.new_zeros(()))
    running_std = state.get("running_std", margin.new_zeros(()))
    kept_margin = (gathered * kept).sum() / kept.sum()  # at least one pair is kept
    beta = beta_dpo_beta(kept_margin, running_mean, config.beta, config.beta_dpo_alpha)
    losses = weighted_sigmoid_loss(batch.margins, beta, mask, kept.mean())
    per_pair = torch.ones_like(margin)
    metrics = {"beta": beta * per_pair, "kept": mask, "running_mean": running_mean * per_pair,
               "running_std": running_std * per_pair}
    return PreferenceLossOutput(losses, metrics)
