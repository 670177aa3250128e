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
