"""Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO"): `cdpo`."""

import torch
import torch.nn.functional as F

from ..citations import Citation
from .inputs import PreferenceLogps
from .registry import register_dpo_loss

PAPER = Citation(
    "A note on DPO with noisy preferences & relationship to IPO", None,
    "@misc{mitchell2023cdpo,\n    title  = {{A note on DPO with noisy preferences \\& relationship to IPO}},\n"
    "    author = {Mitchell, Eric},\n    year   = 2023,\n    url    = {https://ericmitchell.ai/cdpo.pdf},\n}",
)


def cdpo_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """`loss = -(1 - eps) * log sigmoid(beta * margin) - eps * log sigmoid(-beta * margin)`: DPO's sigmoid loss with
    the preference labels smoothed, as if a fraction `eps` of them were flipped. Unlike DPO, it has a finite minimum,
    at `beta * margin = log((1 - eps) / eps)`, so the margin stops growing. `eps = 0` is DPO's sigmoid loss bit for
    bit. (TRL's `robust` loss also reads `label_smoothing` but is a different, unbiased estimator.)

    Args:
        margin: `(B,)` chosen minus rejected log-ratio.
        beta: inverse temperature, as in DPO.
        label_smoothing: `eps` in [0, 0.5); the DPO authors' code defaults to 0, and values around 0.1 are common.
    """
    losses = -F.logsigmoid(beta * margin)
    if label_smoothing == 0:
        return losses
    return (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * margin)


def _check_label_smoothing(config) -> None:
    if not 0 <= config.label_smoothing < 0.5:  # also refuses NaN
        raise ValueError(
            f"`label_smoothing` must be in [0, 0.5) for `cdpo` (the assumed share of flipped labels), got "
            f"{config.label_smoothing}."
        )


@register_dpo_loss("cdpo", citation=PAPER, validate=_check_label_smoothing)
def cdpo(batch: PreferenceLogps, config) -> torch.Tensor:
    """Conservative DPO: DPO's sigmoid loss with TRL's `label_smoothing` field as the share of flipped labels."""
    return cdpo_loss(batch.margins, config.beta, config.label_smoothing)
