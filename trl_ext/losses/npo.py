"""NPO (Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning"):
`npo`, on the rejected completions alone."""

import torch
import torch.nn.functional as F

from ..citations import arxiv_citation
from .inputs import PreferenceLogps
from .registry import register_dpo_loss

PAPER = arxiv_citation("zhang2024negative",
                       "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
                       "Zhang, Ruiqi", 2024, "2404.05868")


def npo_loss(rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """`loss = (2 / beta) * log(1 + (pi(y) / ref(y))^beta) = (2 / beta) * softplus(beta * rho)` on the undesired
    response `y` only (here the rejected completion). It lowers `pi(y)`, like gradient ascent on its NLL, but its
    gradient vanishes as `pi(y) / ref(y) -> 0`, so it does not collapse; as `beta -> 0` its gradient tends to that of
    `rho`, i.e. gradient ascent. The paper uses `beta = 0.1`.

    Args:
        rejected_logratios: `(B,)` log-ratio of each undesired completion.
        beta: inverse temperature, > 0.
    """
    return (2 / beta) * F.softplus(beta * rejected_logratios)


# `beta > 0`, which NPO divides by, is checked with every loss's (`trl_ext.trainers.dpo_config`).
@register_dpo_loss("npo", citation=PAPER, rejected_only=True)
def npo(batch: PreferenceLogps, config) -> torch.Tensor:
    """NPO on the rejected completion of each pair (the chosen one is not used, and may be missing from the data)."""
    return npo_loss(batch.rejected_logratios, config.beta)
