"""Registrations of cDPO, R-DPO, beta-DPO and NPO (math in `trl_ext.preference_losses`; fields in `DPOConfig`)."""

import torch

from . import citations
from .dpo_losses import LossContext, PreferenceLogps, PreferenceLossOutput, check_finite_at_least, register_dpo_loss
from .preference_losses import (
    beta_dpo_beta,
    beta_dpo_filter_mask,
    cdpo_loss,
    exponential_moving_average,
    npo_loss,
    rdpo_loss,
    weighted_sigmoid_loss,
)


def _check_label_smoothing(config) -> None:
    if not 0 <= config.label_smoothing < 0.5:  # also refuses NaN
        raise ValueError(
            f"`label_smoothing` must be in [0, 0.5) for `cdpo` (the assumed share of flipped labels), got "
            f"{config.label_smoothing}."
        )


@register_dpo_loss("cdpo", citation=citations.CDPO, validate=_check_label_smoothing)
def cdpo(batch: PreferenceLogps, config) -> torch.Tensor:
    """Conservative DPO: DPO's sigmoid loss with TRL's `label_smoothing` field as the share of flipped labels."""
    return cdpo_loss(batch.margins, config.beta, config.label_smoothing)


@register_dpo_loss("rdpo", citation=citations.RDPO, validate=lambda config: check_finite_at_least(config, "rdpo_alpha"))
def rdpo(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """R-DPO: DPO with `rdpo_alpha * (|y_w| - |y_l|)` added inside the sigmoid; logs the length difference."""
    length_difference = batch.chosen_lengths - batch.rejected_lengths
    losses = rdpo_loss(batch.margins, batch.chosen_lengths, batch.rejected_lengths, config.beta, config.rdpo_alpha)
    return PreferenceLossOutput(losses, {"length_difference": length_difference})


# `beta > 0`, which NPO divides by, is checked with every loss's (`trl_ext.dpo._check_beta`).
@register_dpo_loss("npo", citation=citations.NPO, rejected_only=True)
def npo(batch: PreferenceLogps, config) -> torch.Tensor:
    """NPO on the rejected completion of each pair (the chosen one is not used, and may be missing from the data)."""
    return npo_loss(batch.rejected_logratios, config.beta)


def _check_beta_dpo(config) -> None:
    check_finite_at_least(config, "beta_dpo_alpha")
    if not 0 <= config.beta_dpo_momentum < 1:
        raise ValueError(f"`beta_dpo_momentum` must be in [0, 1), got {config.beta_dpo_momentum}.")
    if not 0 <= config.beta_dpo_filter_ratio < 1:
        raise ValueError(
            "`beta_dpo_filter_ratio` must be in [0, 1) (the share of pairs dropped), got "
            f"{config.beta_dpo_filter_ratio}."
        )


@register_dpo_loss("beta_dpo", citation=citations.BETA_DPO, stateful=True, validate=_check_beta_dpo)
def beta_dpo(batch: PreferenceLogps, config, context: LossContext) -> PreferenceLossOutput:
    """beta-DPO as in the authors' code: in training, the running mean and standard deviation of the margin (over
    every process's pairs; zero at the start) first take in this batch; then `beta_dpo_filter_ratio` of the pairs
    are dropped, preferring outliers; the batch beta is `beta * (1 + beta_dpo_alpha * (mean kept margin - running
    mean))`, without gradient. Evaluation uses the running statistics without updating them and keeps every pair, so
    its loss is repeatable and draws nothing from the training's random stream (the authors' code updates the
    statistics and filters on evaluation batches too)."""
    margin = batch.margins.detach()
    state = context.state
    if context.training:
        gathered = context.gather(margin).float()
        std = gathered.std() if gathered.numel() > 1 else gathered.new_zeros(())
        momentum = config.beta_dpo_momentum
        state["running_mean"] = exponential_moving_average(state.get("running_mean", 0.0), gathered.mean(), momentum)
        state["running_std"] = exponential_moving_average(state.get("running_std", 0.0), std, momentum)
    running_mean = state.get("running_mean", margin.new_zeros(()))
    running_std = state.get("running_std", margin.new_zeros(()))
    filter_ratio = config.beta_dpo_filter_ratio if context.training else 0.0
    mask = beta_dpo_filter_mask(margin, running_mean, running_std, filter_ratio)
    kept_margin = context.gather(margin * mask).sum() / context.gather(mask).sum().clamp(min=1)
    beta = beta_dpo_beta(kept_margin, running_mean, config.beta, config.beta_dpo_alpha)
    losses = weighted_sigmoid_loss(batch.margins, beta, mask)
    per_pair = torch.ones_like(margin)
    metrics = {"beta": beta * per_pair, "kept": mask, "running_mean": running_mean * per_pair,
               "running_std": running_std * per_pair}
    return PreferenceLossOutput(losses, metrics)

