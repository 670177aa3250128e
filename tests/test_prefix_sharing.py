"""Prefix sharing's layout (`trl_ext.trainers.prefix_sharing`): shared rows by hand, and a fused forward through them
equal to TRL's on `[chosen; rejected]` rows."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_ext.trainers.prefix_sharing import CHOSEN, PADDING, PREFIX, REJECTED, PrefixSharing, allowed_attention, \
    share_prefixes, unshare
from trl_ext.trl_contract import add_fused_lm_head

FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def test_shared_rows_by_hand():
    # Pair 0: prompt [5, 6], chosen [7, 8], rejected [9] (lengths 4 and 3); pair 1: nothing in common
    input_ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0], [5, 6, 9, 0], [3, 0, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    rows = share_prefixes(input_ids, attention_mask)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert rows.segments.tolist() == [[PREFIX, PREFIX, CHOSEN, CHOSEN, REJECTED],
                                      [CHOSEN, CHOSEN, REJECTED, PADDING, PADDING]]
    # Back to TRL's rows (flattened shared positions, pair 1 from 5): padding points at its row's last real token
    assert rows.source.tolist() == [[0, 1, 2, 3], [5, 6, 6, 6], [0, 1, 4, 4], [7, 7, 7, 7]]
    allowed = allowed_attention(rows.segments)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]


def test_identical_completions_share_everything():
    input_ids = torch.tensor([[4, 5, 6], [4, 5, 6]])
    rows = share_prefixes(input_ids, torch.ones_like(input_ids))
    assert rows.input_ids.tolist() == [[4, 5, 6]] and rows.source.tolist() == [[0, 1, 2], [0, 1, 2]]
    hidden = torch.arange(3.0).view(1, 3, 1)
    assert unshare(hidden, rows).squeeze(-1).tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]


def random_pairs(num_pairs: int, width: int, prompt_lengths: list[int], row_lengths: list[int], seed: int = 0):
    """`[chosen; rejected]` rows of random tokens whose pairs share their first `prompt_lengths` tokens, with TRL's
    labels (the completion tokens)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 100, (2 * num_pairs, width), generator=generator)
    prompt = torch.arange(width)[None, :] < torch.tensor(prompt_lengths)[:, None]
    input_ids[num_pairs:][prompt] = input_ids[:num_pairs][prompt]
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(row_lengths)[:, None]).long()
    labels = input_ids.masked_fill((attention_mask == 0) | torch.cat([prompt, prompt]), -100)
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_shared_forward_equals_trls_rows(tiny_model_dir, implementation):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
    add_fused_lm_head(model, outputs=FUSED_OUTPUTS)
    input_ids, attention_mask, labels = random_pairs(3, 14, [5, 3, 0], [14, 9, 11, 12, 14, 6])
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    with PrefixSharing([model]).active():
        shared = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    for name in FUSED_OUTPUTS:
        torch.testing.assert_close(getattr(shared, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
    assert shared.loss.item() == pytest.approx(expected.loss.item(), abs=1e-6)
    # Outside the context the model is the model
    again = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert torch.equal(again.log_probs, expected.log_probs)
