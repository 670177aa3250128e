"""DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228): `dpop` on summed log-probs, `dpop_norm` on per-token
averaged ones."""

import torch
import torch.nn.functional as F

from ..citations import arxiv_citation
from .inputs import PreferenceLogps, PreferenceLossOutput
from .registry import check_finite_at_least, register_dpo_loss

PAPER = arxiv_citation("pal2024smaug", "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
                       "Pal, Arka", 2024, "2402.13228")


def dpop_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    dpop_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO-Positive (eq. 3 of the July 2024 revision).

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


def _dpop_output(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    losses, penalty = dpop_loss(batch.chosen_logratios, batch.rejected_logratios, config.beta, config.dpop_lambda)
    active = (batch.chosen_logratios < 0).float()
    return PreferenceLossOutput(losses, {"penalty": penalty.detach(), "active": active})


def _check_dpop_lambda(config) -> None:
    check_finite_at_least(config, "dpop_lambda")


@register_dpo_loss("dpop", citation=PAPER, validate=_check_dpop_lambda)
def dpop(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """DPOP on summed log-probabilities, as in the paper."""
    return _dpop_output(batch, config)


@register_dpo_loss("dpop_norm", citation=PAPER, validate=_check_dpop_lambda)
def dpop_norm(batch: PreferenceLogps, config) -> PreferenceLossOutput:
    """DPOP on per-token averaged log-probabilities (the length-normalised variant, cf. TRL's `sigmoid_norm`)."""
    return _dpop_output(batch.length_normalized(), config)
