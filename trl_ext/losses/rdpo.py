"""R-DPO (Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization"): `rdpo`."""

import torch
import torch.nn.functional as F

from ..citations import arxiv_citation
from .inputs import PreferenceLogps, PreferenceLossOutput
from .registry import check_finite_at_least, register_dpo_loss

PAPER = arxiv_citation("park2024disentangling", "Disentangling Length from Quality in Direct Preference Optimization",
                       "Park, Ryan", 2024, "2403.19159")


def rdpo_loss(
    margin: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    """Eq. 9: `loss = -log sigmoid(beta * margin + alpha * (|y_w| - |y_l|))`, `|y|` the completion's length in tokens.

    R-DPO maximises the reward minus `alpha * |y|`, so its implicit reward is `beta * rho + alpha * |y|`: a pair whose
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


@register_dpo_loss("rdpo", citation=PAPER, validate=lambda config: check_finite_at_least(config, "rdpo_alpha"))
def rdpo(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """R-DPO: DPO with `rdpo_alpha * (|y_w| - |y_l|)` added inside the sigmoid; logs the length difference."""
    length_difference = batch.chosen_lengths - batch.rejected_lengths
    losses = rdpo_loss(batch.margins, batch.chosen_lengths, batch.rejected_lengths, config.beta, config.rdpo_alpha)
    return PreferenceLossOutput(losses, {"length_difference": length_difference})
