"""DPOP's math and registrations (`trl_ext.losses.dpop`), against numbers computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_ext.losses import PreferenceLogps, compute_dpo_loss
from trl_ext.losses.dpop import dpop_loss


def _softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_dpop_penalty_off_when_chosen_logratio_positive():
    # rho_w = 0.5 >= 0: no penalty, the loss is DPO's: -log sigmoid(0.1 * (0.5 - (-1.5))) = softplus(-0.2)
    losses, penalty = dpop_loss(torch.tensor([0.5]), torch.tensor([-1.5]), beta=0.1, dpop_lambda=50.0)
    assert penalty.item() == 0.0
    assert losses.item() == pytest.approx(_softplus(-0.2), abs=1e-7)  # 0.598139


def test_dpop_penalty_on_when_chosen_logratio_negative():
    # rho_w = -0.2, rho_l = -1.0, lambda 5: penalty 1.0, inner = -0.2 + 1.0 - 1.0 = -0.2, beta 0.5 -> logit -0.1
    losses, penalty = dpop_loss(torch.tensor([-0.2]), torch.tensor([-1.0]), beta=0.5, dpop_lambda=5.0)
    assert penalty.item() == pytest.approx(1.0)
    assert losses.item() == pytest.approx(_softplus(0.1), abs=1e-7)  # 0.744397
    # The same pair under DPO: logit 0.5 * 0.8 = 0.4, a smaller loss
    assert losses.item() > _softplus(-0.4)


def test_dpop_batch_mixes_on_and_off():
    chosen = torch.tensor([1.0, -2.0, 0.0])
    rejected = torch.tensor([0.0, -3.0, -1.0])
    losses, penalty = dpop_loss(chosen, rejected, beta=1.0, dpop_lambda=2.0)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 4.0, 0.0]))
    # inner terms: 1.0, (-2 + 3 - 4) = -3.0, 1.0
    torch.testing.assert_close(losses, torch.tensor([_softplus(-1.0), _softplus(3.0), _softplus(-1.0)]))


def test_dpop_lambda_zero_is_trl_sigmoid_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(2, 64, generator=generator, dtype=torch.float64) * 3
    losses, _ = dpop_loss(chosen, rejected, beta=0.1, dpop_lambda=0.0)
    # trl.DPOTrainer: delta_score = chosen_scores - rejected_scores; -F.logsigmoid(self.beta * delta_score)
    assert torch.equal(losses, -F.logsigmoid(0.1 * (chosen - rejected)))


def _batch(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths):
    return PreferenceLogps(*(torch.tensor(values, dtype=torch.float64) for values in (
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths
    )))


class _Config:
    beta = 0.1
    dpop_lambda = 5.0


def test_registered_dpop_and_dpop_norm_by_hand():
    # Summed: rho_w = -12 - (-10) = -2, rho_l = -20 - (-16) = -4. Penalty 5 * 2 = 10, inner -2 + 4 - 10 = -8.
    # Averaged over 4 chosen / 8 rejected tokens: rho_w = -0.5, rho_l = -0.5, penalty 2.5, inner -0.5 + 0.5 - 2.5.
    batch = _batch([-12.0], [-20.0], [-10.0], [-16.0], [4.0], [8.0])
    summed = compute_dpo_loss("dpop", batch, _Config)
    averaged = compute_dpo_loss("dpop_norm", batch, _Config)
    assert summed.losses.item() == pytest.approx(_softplus(0.8))
    assert summed.metrics["penalty"].item() == pytest.approx(10.0)
    assert summed.metrics["active"].item() == 1.0
    assert averaged.losses.item() == pytest.approx(_softplus(0.25))
    assert averaged.metrics["penalty"].item() == pytest.approx(2.5)


def test_registered_dpop_norm_penalty_off():
    # Averaged: rho_w = (-6 + 8) / 2 = 1 (off), rho_l = (-9 + 6) / 3 = -1: inner 2, beta 0.1 -> logit 0.2
    batch = _batch([-6.0], [-9.0], [-8.0], [-6.0], [2.0], [3.0])
    output = compute_dpo_loss("dpop_norm", batch, _Config)
    assert output.losses.item() == pytest.approx(_softplus(-0.2))
    assert output.metrics["penalty"].item() == 0.0
    assert output.metrics["active"].item() == 0.0


def test_dpop_gradient_raises_chosen_logp_more_than_dpo():
    """Where the chosen log-ratio is negative, DPOP pushes the chosen log-prob up harder than DPO does."""
    ref_chosen, ref_rejected = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -15.0])
    gradients = {}
    for dpop_lambda in (0.0, 50.0):
        chosen = torch.tensor([-11.0, -12.5], requires_grad=True)  # rho_w = -1.0, -0.5
        rejected = torch.tensor([-14.0, -17.0], requires_grad=True)
        losses, _ = dpop_loss(chosen - ref_chosen, rejected - ref_rejected, beta=0.1, dpop_lambda=dpop_lambda)
        losses.mean().backward()
        gradients[dpop_lambda] = chosen.grad
    # Gradient descent moves chosen_logps by -grad: both push up, DPOP by far more.
    assert (-gradients[0.0] > 0).all()
    assert (-gradients[50.0] > -gradients[0.0] * 10).all()
    # By hand for pair 0: d/d rho_w of softplus(-beta * ((1 + lambda) rho_w - rho_l)) / 2
    logit = 0.1 * (51 * -1.0 - (-3.0))
    expected = -0.5 * 0.1 * 51 * torch.sigmoid(torch.tensor(-logit))
    assert gradients[50.0][0].item() == pytest.approx(expected.item(), rel=1e-6)
