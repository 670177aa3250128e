"""cDPO, R-DPO, beta-DPO, NPO and TDPO (`trl_ext.losses`: their math and registrations) against numbers computed by
hand."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from trl_ext import DPOConfig
from trl_ext.losses import LossContext, PreferenceLogps, compute_dpo_loss
from trl_ext.losses.beta_dpo import beta_dpo_beta, beta_dpo_filter_mask, weighted_sigmoid_loss
from trl_ext.losses.cdpo import cdpo_loss
from trl_ext.losses.npo import npo_loss
from trl_ext.losses.rdpo import rdpo_loss
from trl_ext.losses.tdpo import sequential_kl, tdpo_loss, token_kl

from .conftest import free_port


def _softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_cdpo_by_hand():
    # beta * margin = 1: 0.9 * softplus(-1) + 0.1 * softplus(1) = softplus(-1) + 0.1, as softplus(x) - softplus(-x) = x
    losses = cdpo_loss(torch.tensor([2.0]), beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(_softplus(-1.0) + 0.1, abs=1e-7)  # 0.413262


def test_cdpo_has_its_minimum_where_the_smoothed_label_is_matched():
    # d/dz of (1 - eps) softplus(-z) + eps softplus(z) is 0 at z = log((1 - eps) / eps)
    z = torch.tensor([math.log(0.9 / 0.1)], dtype=torch.float64, requires_grad=True)
    cdpo_loss(z, beta=1.0, label_smoothing=0.1).sum().backward()
    assert z.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_rdpo_by_hand():
    # beta * margin + alpha * (30 - 10) = 0.1 + 1.0 = 1.1: a longer chosen completion explains part of the preference
    losses = rdpo_loss(torch.tensor([1.0]), torch.tensor([30.0]), torch.tensor([10.0]), beta=0.1, alpha=0.05)
    assert losses.item() == pytest.approx(_softplus(-1.1), abs=1e-6)  # 0.287335
    # a shorter chosen completion: 0.1 - 1.0 = -0.9, a larger loss
    shorter = rdpo_loss(torch.tensor([1.0]), torch.tensor([10.0]), torch.tensor([30.0]), beta=0.1, alpha=0.05)
    assert shorter.item() == pytest.approx(_softplus(0.9), abs=1e-6)  # 1.241154
    # equal lengths: no regulariser
    same = rdpo_loss(torch.tensor([1.0]), torch.tensor([7.0]), torch.tensor([7.0]), beta=0.1, alpha=0.05)
    assert same.item() == pytest.approx(_softplus(-0.1), abs=1e-7)


def test_npo_by_hand_and_its_gradient_vanishes():
    rho = torch.tensor([-2.0, 0.0, -40.0], dtype=torch.float64, requires_grad=True)
    losses = npo_loss(rho, beta=0.5)
    # (2 / 0.5) * softplus(0.5 * rho): 4 softplus(-1), 4 log 2, ~0
    expected = [4 * _softplus(-1.0), 4 * math.log(2), 4 * _softplus(-20.0)]
    torch.testing.assert_close(losses.detach(), torch.tensor(expected, dtype=torch.float64))
    losses.sum().backward()
    # d/d rho = 2 sigmoid(beta * rho): 2 sigmoid(-1) = 0.537883, 1, ~4e-9 (gradient ascent would give 1 everywhere)
    torch.testing.assert_close(rho.grad, 2 * torch.sigmoid(0.5 * rho.detach()))
    assert rho.grad[0].item() == pytest.approx(0.5378828, abs=1e-6)
    assert rho.grad[2].item() < 1e-8


def test_beta_dpo_beta_by_hand_and_clamped():
    assert beta_dpo_beta(torch.tensor(3.0), torch.tensor(1.0), beta0=0.1, alpha=0.5).item() == pytest.approx(0.2)
    assert beta_dpo_beta(torch.tensor(-1.0), torch.tensor(1.0), beta0=0.1, alpha=0.25).item() == pytest.approx(0.05)
    assert beta_dpo_beta(torch.tensor(-30.0), torch.tensor(0.0), beta0=0.1, alpha=1.0).item() == pytest.approx(1e-3)


def test_beta_dpo_filter_drops_the_outlier():
    margin = torch.tensor([0.0, 0.1, 10.0, -0.1])
    generator = torch.Generator().manual_seed(0)
    mask = beta_dpo_filter_mask(margin, torch.tensor(0.0), torch.tensor(1.0), 0.25, generator)
    # keeps int(4 * 0.75) = 3; the pair 10 standard deviations out has weight exp(-50)
    assert mask.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert beta_dpo_filter_mask(margin, torch.tensor(0.0), torch.tensor(1.0), 0.0).tolist() == [1.0] * 4
    # zero running std: every pair equally likely; at least one pair is always kept
    assert beta_dpo_filter_mask(margin, torch.tensor(0.0), torch.tensor(0.0), 0.5).sum().item() == 2
    assert beta_dpo_filter_mask(margin[:1], torch.tensor(0.0), torch.tensor(1.0), 0.9).tolist() == [1.0]


def test_weighted_sigmoid_loss_mean_is_the_mean_over_kept_pairs():
    margin = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    losses = weighted_sigmoid_loss(margin, 0.5, mask, mask.mean())
    assert losses[1].item() == 0.0
    assert losses.mean().item() == pytest.approx((_softplus(-0.5) + _softplus(-1.5) + _softplus(-2.0)) / 3)


BETA_DPO_PAIRS = ([3.0, 1.0, 0.5, 2.0], [1.0, -3.0, 0.0, 2.5])
BETA_DPO_STATE = {"running_mean": 1.0, "running_std": 1.0}


def beta_dpo_on_two_processes(rank: int, port: int, output_dir: str):
    """One of two gloo processes holding 2 of the 4 pairs each: its beta-DPO losses and metrics, written out."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def gather(tensor):
        parts = [torch.empty_like(tensor) for _ in range(2)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    chosen, rejected = (values[2 * rank:2 * rank + 2] for values in BETA_DPO_PAIRS)
    state = {key: torch.tensor(value) for key, value in BETA_DPO_STATE.items()}
    config = _config(output_dir, loss_type="beta_dpo", beta_dpo_filter_ratio=0.5)
    context = LossContext(state, True, gather, process_index=rank)
    output = compute_dpo_loss("beta_dpo", replace(_pairs(chosen, rejected), context=context), config)
    torch.save({"losses": output.losses, **output.metrics}, f"{output_dir}/process-{rank}.pt")
    torch.distributed.destroy_process_group()


def test_beta_dpo_draws_over_every_process_alike(tmp_path):
    """Two processes of 2 pairs each draw once over the 4 pairs, as one process holding the 4 does, each keeping its
    own slice; their losses averaged (as DDP averages gradients) are the single process's mean over the kept pairs."""
    state = {key: torch.tensor(value) for key, value in BETA_DPO_STATE.items()}
    config = _config(tmp_path, loss_type="beta_dpo", beta_dpo_filter_ratio=0.5)
    single = compute_dpo_loss("beta_dpo", replace(_pairs(*BETA_DPO_PAIRS), context=_context(state)), config)
    port = free_port()
    torch.multiprocessing.spawn(beta_dpo_on_two_processes, args=(port, str(tmp_path)), nprocs=2)
    processes = [torch.load(tmp_path / f"process-{rank}.pt") for rank in range(2)]
    assert single.metrics["kept"].sum().item() == 2
    assert torch.cat([process["kept"] for process in processes]).tolist() == single.metrics["kept"].tolist()
    assert torch.cat([process["beta"] for process in processes]).tolist() == pytest.approx(
        single.metrics["beta"].tolist())
    averaged = sum(process["losses"].mean() for process in processes) / 2
    assert averaged.item() == pytest.approx(single.losses.mean().item())
    kept = single.metrics["kept"].bool()
    margins = torch.tensor(BETA_DPO_PAIRS[0]) - torch.tensor(BETA_DPO_PAIRS[1])
    per_pair = -F.logsigmoid(single.metrics["beta"][0] * margins)
    assert single.losses.mean().item() == pytest.approx(per_pair[kept].mean().item())


def _pairs(chosen_logratios, rejected_logratios, chosen_lengths=None, rejected_lengths=None) -> PreferenceLogps:
    chosen, rejected = torch.tensor(chosen_logratios, dtype=torch.float64), torch.tensor(rejected_logratios,
                                                                                        dtype=torch.float64)
    zeros = torch.zeros_like(chosen)
    return PreferenceLogps(chosen, rejected, zeros, zeros,
                           torch.tensor(chosen_lengths or [5.0] * len(chosen), dtype=torch.float64),
                           torch.tensor(rejected_lengths or [5.0] * len(chosen), dtype=torch.float64))


def _context(state=None, training=True) -> LossContext:
    return LossContext({} if state is None else state, training, gather=lambda tensor: tensor)


def _config(tmp_path, **fields) -> DPOConfig:
    return DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, **fields)


def test_registered_beta_dpo_first_step_by_hand(tmp_path):
    config = _config(tmp_path, loss_type="beta_dpo", beta=0.1, beta_dpo_alpha=0.5, beta_dpo_filter_ratio=0.0)
    context = _context()
    output = compute_dpo_loss("beta_dpo", replace(_pairs([3.0, 1.0], [1.0, -3.0]), context=context), config)
    # margins 2 and 4. Running statistics from 0 with momentum 0.9: mean 0.1 * 3 = 0.3, std 0.1 * sqrt(2).
    assert context.state["running_mean"].item() == pytest.approx(0.3)
    assert context.state["running_std"].item() == pytest.approx(0.1 * math.sqrt(2))
    # Both pairs kept (mean 3): beta = 0.1 * (1 + 0.5 * (3 - 0.3)) = 0.235
    assert output.metrics["beta"].tolist() == pytest.approx([0.235, 0.235])
    assert output.losses.tolist() == pytest.approx([_softplus(-0.47), _softplus(-0.94)])
    # Evaluation reads the state without updating it
    evaluation = compute_dpo_loss("beta_dpo", replace(_pairs([0.0], [-1.0]), context=_context(context.state, False)),
                                  config)
    assert context.state["running_mean"].item() == pytest.approx(0.3)
    assert evaluation.metrics["beta"].item() == pytest.approx(0.1 * (1 + 0.5 * (1 - 0.3)))


@pytest.mark.parametrize(
    "fields",
    [
        {"loss_type": "cdpo", "label_smoothing": 0.0},
        {"loss_type": "rdpo", "rdpo_alpha": 0.0},
        {"loss_type": "beta_dpo", "beta_dpo_alpha": 0.0, "beta_dpo_filter_ratio": 0.0},
    ],
    ids=lambda fields: fields["loss_type"],
)
def test_degenerate_settings_are_dpo_exactly(tmp_path, fields):
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(2, 64, generator=generator, dtype=torch.float64) * 3
    lengths = torch.randint(1, 50, (2, 64), generator=generator).double()
    zeros = torch.zeros(64, dtype=torch.float64)
    batch = PreferenceLogps(chosen, rejected, zeros, zeros, *lengths)
    output = compute_dpo_loss(fields["loss_type"], replace(batch, context=_context()), _config(tmp_path, **fields))
    # trl.DPOTrainer's sigmoid: -F.logsigmoid(self.beta * delta_score)
    assert torch.equal(output.losses, -F.logsigmoid(0.1 * (chosen - rejected)))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"loss_type": "cdpo", "label_smoothing": 0.5}, r"`label_smoothing` must be in \[0, 0.5\) for `cdpo`"),
        ({"loss_type": "rdpo", "rdpo_alpha": -0.1}, r"`rdpo_alpha` must be a finite number >= 0, got -0.1"),
        ({"loss_type": "rdpo", "rdpo_alpha": math.nan}, r"`rdpo_alpha` must be a finite number >= 0, got nan"),
        ({"loss_type": "npo", "beta": 0.0}, r"`beta` must be > 0 for `npo`"),
        ({"loss_type": "beta_dpo", "beta_dpo_alpha": math.inf}, r"`beta_dpo_alpha` must be a finite number >= 0"),
        ({"loss_type": "beta_dpo", "beta_dpo_momentum": 1.0}, r"`beta_dpo_momentum` must be in \[0, 1\)"),
        ({"loss_type": "beta_dpo", "beta_dpo_filter_ratio": 1.0}, r"`beta_dpo_filter_ratio` must be in \[0, 1\)"),
        ({"loss_type": "tdpo2", "tdpo_alpha": -1.0}, r"`tdpo_alpha` must be a finite number >= 0, got -1.0"),
        ({"loss_type": "tdpo1", "precompute_ref_log_probs": True},
         r"`tdpo1` reads the reference's per-token log-probs, but `precompute_ref_log_probs=True`"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_field(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **fields)


def test_tdpo_by_hand():
    margin, chosen_kl, rejected_kl = torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0])
    # TDPO1: beta * (1 - (2 - 0.5)) = -0.05; TDPO2 with alpha 0.5: beta * (1 - 0.5 * 1.5) = 0.025
    assert tdpo_loss(margin, chosen_kl, rejected_kl, beta=0.1).item() == pytest.approx(_softplus(0.05), abs=1e-7)
    assert tdpo_loss(margin, chosen_kl, rejected_kl, beta=0.1, alpha=0.5).item() == pytest.approx(_softplus(-0.025),
                                                                                               abs=1e-7)


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
    chosen_kl, rejected_kl = torch.tensor([0.5], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    tdpo_loss(torch.tensor([1.0]), chosen_kl, rejected_kl, beta=0.1, alpha=0.5).sum().backward()
    assert chosen_kl.grad is None  # no path from the loss back to it
    # d/dD_l of softplus(-beta * (m - alpha * D_l)) = beta * alpha * sigmoid(-0.025)
    assert rejected_kl.grad.item() == pytest.approx(0.05 * torch.sigmoid(torch.tensor(-0.025)).item(), rel=1e-6)


def test_token_kl_by_hand():
    # ref = (1/2, 1/2), pi = (3/4, 1/4): KL = 1/2 log(2/3) + 1/2 log 2
    kl = token_kl(torch.log(torch.tensor([[0.75, 0.25]])), torch.zeros(1, 2))
    assert kl.item() == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2), abs=1e-7)


def test_sequential_kl_in_chunks_equals_full_logits_with_gradient():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=generator, requires_grad=True)
    ref_weight = torch.randn(50, 8, generator=generator)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    ref_hidden = torch.randn(10, 8, generator=generator)
    chunked = sequential_kl(hidden, ref_hidden, lambda h: h @ weight.T, lambda h: h @ ref_weight.T, chunk_size=4)
    full = token_kl(hidden @ weight.T, ref_hidden @ ref_weight.T)
    torch.testing.assert_close(chunked, full)
    chunked_grads = torch.autograd.grad(chunked.sum(), (weight, hidden))
    full_grads = torch.autograd.grad(full.sum(), (weight, hidden))
    for chunked_grad, full_grad in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(chunked_grad, full_grad)
