"""KL-SFT and IFT math (`trl_ext.losses.kl_sft`, `trl_ext.losses.ift`) and the unpacking of packed rows, against
numbers computed by hand."""

import math

import pytest
import torch

from trl_ext.losses.ift import ift_loss, ift_mix_embeddings, relation_propagation_weights
from trl_ext.losses.kl_sft import sq_logratio_penalty, token_kl_penalty
from trl_ext.trainers.packed import unpack_sequences

MASK = torch.tensor([[1.0, 1.0, 0.0]])  # two target tokens, then padding


def test_sq_logratio_penalty():
    # averages over the two target tokens: policy -1.5, reference -2.0 -> (0.5)^2; the padded -9 is ignored
    penalty = sq_logratio_penalty(torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-2.0, -2.0, -9.0]]), MASK)
    assert penalty.item() == pytest.approx(0.25)


def test_token_kl_penalty():
    # r = ref - policy = [-1, 0]: k3 = [e^-1 + 1 - 1, 0], mean over 2 tokens
    penalty = token_kl_penalty(torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-2.0, -2.0, -9.0]]), MASK)
    assert penalty.item() == pytest.approx(math.exp(-1) / 2)


def test_kl_sft_gradient_pulls_policy_toward_reference():
    ref = torch.tensor([[-2.0, -2.0, 0.0]])
    for penalty_fn in (sq_logratio_penalty, token_kl_penalty):
        above = torch.tensor([[-1.0, -1.5, 0.0]], requires_grad=True)  # more likely than under the reference
        below = torch.tensor([[-3.0, -2.5, 0.0]], requires_grad=True)
        penalty_fn(above, ref, MASK).sum().backward()
        penalty_fn(below, ref, MASK).sum().backward()
        assert (above.grad[0, :2] > 0).all() and (below.grad[0, :2] < 0).all()  # descent moves each toward ref
        assert above.grad[0, 2] == 0 and below.grad[0, 2] == 0  # no gradient off the target tokens


def test_ift_mixing_changes_only_masked_positions():
    tokens = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    predicted = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]])
    mixed = ift_mix_embeddings(tokens, predicted, torch.tensor([[False, True, True]]), ift_lambda=0.2)
    # 0.8 * 2 + 0.2 * 20 = 5.6, 0.8 * 3 + 0.2 * 30 = 8.4; position 0 keeps its ground-truth embedding
    torch.testing.assert_close(mixed, torch.tensor([[[1.0, 1.0], [5.6, 5.6], [8.4, 8.4]]]))


def test_relation_propagation_weights_by_hand():
    # nll [1, 2, 3], gamma 0.5: c = [1/3, 2/3, 1]; r = [11/12, 7/6, 1]; sum r = 37/12; w = 3 r / sum r
    nll = torch.tensor([[1.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    weights = relation_propagation_weights(nll, mask, gamma=0.5)
    torch.testing.assert_close(weights, torch.tensor([[33 / 37, 42 / 37, 36 / 37, 0.0]], dtype=torch.float64))
    assert weights.sum().item() == pytest.approx(3.0)  # mean weight 1 over the target tokens
    # loss = (33 * 1 + 42 * 2 + 36 * 3) / 37 / 3
    assert ift_loss(nll, mask, gamma=0.5).item() == pytest.approx(225 / 111)


def test_ift_gamma_zero_is_per_sequence_mean_nll():
    nll = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(relation_propagation_weights(nll, mask, gamma=0.0), mask)
    torch.testing.assert_close(ift_loss(nll, mask, gamma=0.0), torch.tensor([2.0, 4.0]))


def test_ift_weight_gradient_detached_or_not():
    mask = torch.ones(1, 3)
    gradients = {}
    for detach in (False, True):
        nll = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        ift_loss(nll, mask, gamma=0.5, detach_weights=detach).sum().backward()
        gradients[detach] = nll.grad
    # Detached weights: d loss / d nll_t = w_t / n exactly
    with torch.no_grad():
        weights = relation_propagation_weights(torch.tensor([[1.0, 2.0, 3.0]]), mask, gamma=0.5)
    torch.testing.assert_close(gradients[True], weights / 3)
    # Not detached: the weights' own gradient adds to it
    assert not torch.allclose(gradients[False], gradients[True])


def test_unpack_sequences_pads_each_sequence_to_a_row():
    packed = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    rows = unpack_sequences(packed, torch.tensor([0, 2, 5, 6]))
    assert rows.tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0], [6.0, 0.0, 0.0]]
    mask = unpack_sequences(torch.tensor([[True, True, False, True, True, True]]), torch.tensor([0, 2, 6]))
    assert mask.tolist() == [[True, True, False, False], [False, True, True, True]]
