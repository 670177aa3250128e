"""Prefix sharing's layout (`trl_ext.trainers.prefix_sharing`): shared rows by hand, and a fused forward through them
equal to TRL's on `[chosen; rejected]` rows."""

import contextlib
import re

import pytest
import torch
from datasets import Dataset
from peft import PromptTuningConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from trl_ext import DPOConfig, DPOTrainer
from trl_ext.scripts import dpo as dpo_script
from trl_ext.trainers import prefix_sharing
from trl_ext.trainers.prefix_sharing import PrefixSharing, allowed_attention, share_prefixes, unshare
from trl_ext.trl_contract import add_fused_lm_head, lm_backbone

from .conftest import CHOSEN, LORA, OPENERS, REJECTED, make_config, multi_cpu_launcher, run_dpo_script, train

FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def test_shared_rows_by_hand():
    # Pair 0: prompt [5, 6], chosen [7, 8], rejected [9] (lengths 4 and 3); pair 1: nothing in common
    input_ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0], [5, 6, 9, 0], [3, 0, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    rows = share_prefixes(input_ids, attention_mask)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    prefix, chosen, rejected, padding = (prefix_sharing.PREFIX, prefix_sharing.CHOSEN, prefix_sharing.REJECTED,
                                         prefix_sharing.PADDING)
    assert rows.segments.tolist() == [[prefix, prefix, chosen, chosen, rejected],
                                      [chosen, chosen, rejected, padding, padding]]
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


@pytest.mark.parametrize("implementation", [
    "sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow),  # flex: compiled (~10 s)
])
def test_a_shared_forward_equals_trls_rows(tiny_model_dir, implementation):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
    add_fused_lm_head(model, outputs=FUSED_OUTPUTS)
    input_ids, attention_mask, labels = random_pairs(3, 14, [5, 3, 0], [14, 9, 11, 12, 14, 6])
    # FlexAttention has no backward on a CPU: there, the forward alone
    gradient = torch.no_grad() if implementation == "flex_attention" else contextlib.nullcontext()
    with gradient:
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        with PrefixSharing([model]).active():
            shared = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    for name in FUSED_OUTPUTS:
        torch.testing.assert_close(getattr(shared, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
    assert shared.loss.item() == pytest.approx(expected.loss.item(), abs=1e-6)
    # Outside the context the model is the model
    with gradient:
        again = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert torch.equal(again.log_probs, expected.log_probs)


def sharing_pair(tiny_model_dir, dataset, tmp_path, trainer_kwargs=None, **fields):
    """Two trainers built alike but for `prefix_sharing`, their adapters (or weights) moved off the reference alike."""
    trainers = []
    for share in (False, True):
        torch.manual_seed(0)
        trainer = DPOTrainer(model=tiny_model_dir, train_dataset=dataset, **(trainer_kwargs or {}),
                             args=make_config(DPOConfig, tmp_path / str(share), prefix_sharing=share, **fields))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in trainer.model.named_parameters():
                if parameter.requires_grad:
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        trainers.append(trainer)
    return trainers


def loss_metrics_and_gradients(trainer, batch) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    torch.manual_seed(0)  # beta-DPO draws the pairs it drops
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if key != "num_tokens"}
    gradients = {name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()
                 if parameter.grad is not None}
    return loss.item(), metrics, gradients


def assert_same_step(unshared, shared, batch_size: int = 4):
    rows = [unshared.train_dataset[i] for i in range(batch_size)]
    expected = loss_metrics_and_gradients(unshared, unshared._prepare_inputs(unshared.data_collator(rows)))
    actual = loss_metrics_and_gradients(shared, shared._prepare_inputs(shared.data_collator(rows)))
    assert actual[0] == pytest.approx(expected[0], abs=1e-5)
    assert actual[1] == pytest.approx(expected[1], abs=1e-5)
    assert actual[2].keys() == expected[2].keys() and expected[2]
    for name, gradient in expected[2].items():
        torch.testing.assert_close(actual[2][name], gradient, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fields", [
    {"loss_type": ["sigmoid"]}, {"loss_type": ["ipo"]}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    {"loss_type": ["dpop"], "dpop_lambda": 5.0}, {"loss_type": ["dpop_norm"]}, {"loss_type": ["beta_dpo"]},
    {"loss_type": ["tdpo2"]},
], ids=lambda fields: "+".join(fields["loss_type"]))
def test_a_shared_step_equals_the_unshared_one(tiny_model_dir, preference_dataset, tmp_path, fields):
    """Loss, every logged metric and every parameter gradient, with a PEFT policy whose adapter is disabled as the
    reference."""
    assert_same_step(*sharing_pair(tiny_model_dir, preference_dataset, tmp_path, {"peft_config": LORA}, **fields))


@pytest.mark.parametrize("setup", ["ref_model", "eager_ref_model", "gradient_checkpointing", "full_fine_tuning"])
def test_a_shared_step_equals_the_unshared_one_in_other_setups(tiny_model_dir, preference_dataset, tmp_path, setup):
    """`eager_ref_model`: the reference takes its mask in the form of its own attention, not the SDPA policy's."""
    trainer_kwargs, fields = {}, {"loss_type": ["dpop"]}
    if setup.endswith("ref_model"):
        trainer_kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, attn_implementation="eager" if setup.startswith("eager") else "sdpa")
    if setup == "gradient_checkpointing":
        trainer_kwargs["peft_config"] = LORA
        fields["gradient_checkpointing"] = True
    unshared, shared = sharing_pair(tiny_model_dir, preference_dataset, tmp_path, trainer_kwargs, **fields)
    if setup == "gradient_checkpointing":  # on as `train()` turns it on
        for trainer in (unshared, shared):
            trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    assert_same_step(unshared, shared)


def test_precomputed_reference_log_probs_are_shared_too(tiny_model_dir, preference_dataset, tmp_path):
    """TRL's precompute runs `compute_ref_log_probs` batch by batch: its backbone forward takes one row per pair."""
    unshared, shared = sharing_pair(tiny_model_dir, preference_dataset, tmp_path, {"peft_config": LORA},
                                    loss_type=["dpop"], precompute_ref_log_probs=True)
    rows = [unshared.train_dataset[i] for i in range(4)]
    batch = unshared._prepare_inputs(unshared.data_collator(rows))
    backbone_rows = []
    hook = lm_backbone(shared.model).register_forward_pre_hook(
        lambda module, args, kwargs: backbone_rows.append(kwargs["input_ids"].size(0)), with_kwargs=True)
    try:
        actual = shared.compute_ref_log_probs(shared.model, batch)
    finally:
        hook.remove()
    expected = unshared.compute_ref_log_probs(unshared.model, batch)
    assert backbone_rows == [4]  # 4 pairs, not 8 rows
    for ours, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert_same_step(unshared, shared)


def test_evaluation_and_training_log_the_same(tiny_model_dir, preference_dataset, tmp_path):
    fields = dict(loss_type=["sigmoid", "dpop"], max_steps=2, eval_strategy="steps", eval_steps=2)
    logs = []
    for share in (False, True):
        trainer = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / str(share),
                        {"peft_config": LORA, "eval_dataset": preference_dataset}, prefix_sharing=share, **fields)
        logs.append([{key: value for key, value in entry.items() if "runtime" not in key and "per_second" not in key}
                     for entry in trainer.state.log_history])
    assert any("eval_rewards/margins" in entry for entry in logs[1])
    for unshared_entry, shared_entry in zip(*logs, strict=True):
        assert shared_entry == pytest.approx(unshared_entry, abs=1e-5)


def backbone_linear_flops(trainer, batch) -> int:
    """FLOPs of the decoder layers' matrix products (their linear layers) in one training step's loss and backward."""
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.compute_loss(trainer.model, batch).backward()
    return sum(sum(counts.values()) for module, counts in counter.get_flop_counts().items()
               if re.search(r"\.layers\.\d+$", module))


def test_the_backbone_runs_each_prompt_once(tiny_model_dir, tmp_path):
    """Linear FLOPs scale with the tokens the backbone runs: `B (P + C + R)` shared (`P` the pair's common prefix:
    the prompt, and here the completions' common first word), against TRL's `2 B (P + max(C, R))` (its rows padded to
    the longer completion)."""
    dataset = Dataset.from_dict({"prompt": [OPENERS[2]] * 4, "chosen": [CHOSEN] * 4, "rejected": [REJECTED] * 4})
    unshared, shared = sharing_pair(tiny_model_dir, dataset, tmp_path, {"peft_config": LORA}, loss_type=["sigmoid"])
    batch = unshared._prepare_inputs(unshared.data_collator([unshared.train_dataset[i] for i in range(4)]))
    chosen_row, rejected_row = (batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() for row in (0, 4))
    common = next(i for i, (a, b) in enumerate(zip(chosen_row, rejected_row)) if a != b)
    assert common > int((batch["completion_mask"][0] == 0).sum())  # the prompt, and " the"
    chosen, rejected = len(chosen_row) - common, len(rejected_row) - common
    rows = share_prefixes(batch["input_ids"], batch["attention_mask"])
    assert rows.input_ids.shape == (4, common + chosen + rejected)
    assert batch["input_ids"].shape == (8, common + max(chosen, rejected))
    unshared_flops = backbone_linear_flops(unshared, batch)
    shared_flops = backbone_linear_flops(shared, batch)
    assert shared_flops * 8 * (common + max(chosen, rejected)) == unshared_flops * 4 * (common + chosen + rejected)
    assert shared_flops < unshared_flops


def test_what_shared_rows_cannot_reproduce_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prefix_sharing.check_prefix_sharing_can_run(model, max_length=None, aux_loss_enabled=False)  # SDPA: runs
    with pytest.raises(ValueError, match=r"MoE load-balancing loss .* `output_router_logits=False`, or set "
                                         r"`prefix_sharing=False`"):
        prefix_sharing.check_prefix_sharing_can_run(model, max_length=None, aux_loss_enabled=True)
    model.config.output_router_logits = True  # the model computes the loss even where TRL does not add it
    with pytest.raises(ValueError, match=r"MoE load-balancing loss"):
        prefix_sharing.check_prefix_sharing_can_run(model, max_length=None, aux_loss_enabled=False)
    del model.config.output_router_logits
    model.config.sliding_window = 16
    with pytest.raises(ValueError, match=r"sliding window of 16 tokens: set `max_length` <= 16"):
        prefix_sharing.check_prefix_sharing_can_run(model, max_length=32, aux_loss_enabled=False)
    prefix_sharing.check_prefix_sharing_can_run(model, max_length=16, aux_loss_enabled=False)
    del model.config.sliding_window
    prompt_tuning = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match=r"prompt-learning PEFT \(`PeftType.PROMPT_TUNING`\)"):
        prefix_sharing.check_prefix_sharing_can_run(prompt_tuning, max_length=None, aux_loss_enabled=False)


def test_an_attention_without_a_custom_mask_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"`prefix_sharing=True` needs an attention implementation that takes a "
                                         r"custom mask .* `model_init_kwargs` asks for `flash_attention_2`"):
        make_config(DPOConfig, tmp_path, prefix_sharing=True,
                    model_init_kwargs={"attn_implementation": "flash_attention_2"})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config._attn_implementation = "flash_attention_2"  # as if loaded with it: this machine has no flash-attn
    with pytest.raises(ValueError, match=r"runs `flash_attention_2`. Load it with `attn_implementation='sdpa'`"):
        prefix_sharing.check_prefix_sharing_can_run(model, max_length=None, aux_loss_enabled=False)


def test_a_model_that_ignores_the_mask_is_refused(tiny_model_dir):
    """A probe pair through the model's own forward: attention that drops the custom mask (as some remote-code models
    do) sees the other completion, and the probe's hidden states differ."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "attention_mask": None}), with_kwargs=True)
    with pytest.raises(ValueError, match=r"does not honour the custom attention mask"):
        prefix_sharing.check_prefix_sharing_can_run(model, max_length=None, aux_loss_enabled=False)


@pytest.mark.e2e
def test_two_process_data_parallel_shares_as_one_process_does(tiny_model_dir, tmp_path):
    """`trl-ext dpo --prefix_sharing true` under 2-process DDP on CPU (gloo) logs what the unshared run logs."""
    launcher = multi_cpu_launcher()

    def run(share: bool) -> list[dict]:
        history = run_dpo_script(launcher, ["-m", "trl_ext.cli", "dpo"], tiny_model_dir, tmp_path / f"share-{share}",
                                 batch_size=4, extra=("--prefix_sharing", str(share).lower()))
        return [{key: value for key, value in entry.items() if "runtime" not in key and "per_second" not in key}
                for entry in history]

    _, training_args, *_ = dpo_script.parse_args(["--model_name_or_path", tiny_model_dir, "--dataset_name", "x.jsonl",
                                                  "--prefix_sharing", "true"])
    assert training_args.prefix_sharing is True
    unshared, shared = run(False), run(True)
    assert len([entry for entry in shared if "loss" in entry]) == 3 and "dpop/penalty" in shared[0]
    for unshared_entry, shared_entry in zip(unshared, shared, strict=True):
        assert shared_entry == pytest.approx(unshared_entry, abs=1e-5)
