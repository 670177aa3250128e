"""Each TRL and transformers internal trl_ext relies on (`trl_ext.trl_contract`), checked on its own.

When a TRL or transformers upgrade breaks one, the failing test's name says which assumption broke.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
import trl
from accelerate import Accelerator
from packaging.requirements import Requirement
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from trl_ext import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer, trl_contract
from trl_ext.trl_contract import (
    PRIVATE_METHODS,
    TRL_DPO_CHOSEN_METRICS,
    TRL_DPO_LOSS_TYPES,
    TRL_SFT_LOSS_TYPES,
    ExpectedForward,
    FusedCausalLMOutput,
    PrivateMethod,
    TRLContractError,
    add_fused_lm_head,
    check_recorded_forwards,
    create_reference_model,
    hash_module,
    print_trl_env,
    record_fused_outputs,
    unwrap_model_for_generation,
    use_adapter,
)

from .conftest import LORA, make_config

ROOT = Path(__file__).resolve().parents[1]


def test_installed_metadata_declares_the_packages_requirements():
    """pyproject's dependencies are read from `trl_ext/requirements.txt`, the file trl_ext checks at import: the
    installed distribution declares exactly those (reinstall with `pip install -e .` if this fails)."""
    installed = [Requirement(line) for line in importlib.metadata.requires("trl-ext") if ";" not in line]
    assert installed == list(trl_contract.declared_requirements().values())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["trl_ext/requirements.txt"]}
    assert "requirements.txt" in pyproject["tool"]["setuptools"]["package-data"]["trl_ext"]  # shipped in the wheel


def test_installed_trl_and_transformers_are_supported():
    trl_contract.check_versions()


@pytest.mark.parametrize("name", ["trl", "transformers"])
def test_unsupported_release_is_refused_naming_the_range(monkeypatch, name):
    declared = re.escape(str(trl_contract.declared_requirements()[name]))
    monkeypatch.delenv(trl_contract.ALLOW_UNSUPPORTED_ENV, raising=False)
    with pytest.raises(ImportError, match=rf"trl_ext supports `{declared}`, but {name} 0\.1\.0 is installed\. "
                                          rf"Install a supported release \(`pip install '{declared}'`\), or set "
                                          r"TRL_EXT_ALLOW_UNSUPPORTED_TRL=1"):
        trl_contract.check_version(name, "0.1.0")
    monkeypatch.setenv(trl_contract.ALLOW_UNSUPPORTED_ENV, "1")
    with pytest.warns(UserWarning, match=f"{name} 0.1.0 is installed"):
        trl_contract.check_version(name, "0.1.0")


def test_import_refuses_an_unsupported_transformers_without_installed_metadata():
    """`import trl_ext` reads the declared ranges from the package, not from installed metadata (a checkout on
    `PYTHONPATH` has none), and checks transformers' release before anything relies on its internals."""
    script = textwrap.dedent("""
        import importlib.metadata

        find_distribution = importlib.metadata.Distribution.from_name.__func__
        installed_version = importlib.metadata.version

        def from_name(cls, name):  # as if trl-ext were not installed
            if name.replace("_", "-").lower() == "trl-ext":
                raise importlib.metadata.PackageNotFoundError(name)
            return find_distribution(cls, name)

        importlib.metadata.Distribution.from_name = classmethod(from_name)
        importlib.metadata.version = lambda name: "4.57.0" if name == "transformers" else installed_version(name)
        import trl_ext
    """)
    environment = {key: value for key, value in os.environ.items() if key != trl_contract.ALLOW_UNSUPPORTED_ENV}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=300)
    declared = str(trl_contract.declared_requirements()["transformers"])
    assert result.returncode == 1
    assert (f"ImportError: trl_ext supports `{declared}`, but transformers 4.57.0 is installed. Install a supported "
            f"release (`pip install '{declared}'`)") in result.stderr


@pytest.mark.parametrize("method", PRIVATE_METHODS, ids=lambda m: f"{m.owner.__name__}.{m.name}")
def test_private_method_keeps_its_signature(method):
    assert method.problem() is None


def test_changed_private_method_is_named():
    renamed = PrivateMethod(trl.DPOTrainer, "_compute_loss_v2", ("self",))
    assert renamed.problem() == "`DPOTrainer._compute_loss_v2` no longer exists"
    reshaped = PrivateMethod(trl.DPOTrainer, "_compute_loss", ("self", "model", "inputs"))
    assert "now takes ('self', 'model', 'inputs', 'return_outputs')" in reshaped.problem()


def test_trl_dpo_loss_types_are_the_ones_trl_lists(tiny_model_dir, preference_dataset, tmp_path):
    trainer = trl.DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                             args=make_config(trl.DPOConfig, tmp_path, loss_type="no_such_loss"))
    with pytest.raises(ValueError) as error:
        trainer.train()
    listed = str(error.value).split("Should be one of ")[1]
    assert sorted(eval(listed)) == sorted(TRL_DPO_LOSS_TYPES)


def test_trl_sft_loss_types_are_accepted_by_trl(tmp_path):
    assert set(TRL_SFT_LOSS_TYPES) <= set(trl_contract.TRL_SFT_LOSS_CHOICES)
    for loss_type in TRL_SFT_LOSS_TYPES:
        assert make_config(trl.SFTConfig, tmp_path, loss_type=loss_type).loss_type == loss_type


def test_fused_output_carries_log_probs_and_label_mask(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(model)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    labels = input_ids.masked_fill(torch.tensor([[True, True, False, False]]), -100)
    output = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert isinstance(output, FusedCausalLMOutput)
    assert output.log_probs.shape == output.label_mask.shape == (1, 3)  # shifted: position t scores token t + 1
    assert output.label_mask.tolist() == [[False, True, True]]
    logits = model(input_ids=input_ids).logits.log_softmax(-1)
    expected = logits[0, :-1].gather(1, input_ids[0, 1:, None]).squeeze(1) * output.label_mask[0]
    torch.testing.assert_close(output.log_probs[0], expected)


def _perturbed_peft_dpo_trainer(tiny_model_dir, preference_dataset, tmp_path, **trainer_kwargs):
    trainer = trl.DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                             args=make_config(trl.DPOConfig, tmp_path), peft_config=LORA, **trainer_kwargs)
    with torch.no_grad():  # move the adapter away from zero, so that policy and reference differ
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    return trainer


def _batch(trainer, dataset, size: int = 4):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(size)]))


def test_dpo_forwards_policy_then_reference_on_chosen_then_rejected_rows(tiny_model_dir, preference_dataset,
                                                                         tmp_path):
    trainer = _perturbed_peft_dpo_trainer(tiny_model_dir, preference_dataset, tmp_path)
    batch = _batch(trainer, preference_dataset)
    trainer.model.train()
    with record_fused_outputs(trainer.accelerator, trainer.model) as recorded:
        trainer._compute_loss(trainer.model, batch, return_outputs=False)
    assert len(recorded) == 2
    policy, reference = recorded
    assert policy.log_probs.requires_grad and not reference.log_probs.requires_grad
    assert policy.log_probs.shape == reference.log_probs.shape == (8, batch["input_ids"].size(1) - 1)
    # TRL's own metrics, read back from the rows: the first half is chosen, the second rejected
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    policy_logps, reference_logps = policy.log_probs.sum(1).detach(), reference.log_probs.sum(1)
    assert metrics["logps/chosen"] == pytest.approx(policy_logps[:4].mean().item(), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(policy_logps[4:].mean().item(), rel=1e-5)
    rewards = trainer.beta * (policy_logps - reference_logps)
    assert abs(rewards[:4].mean().item()) > 1e-4  # the perturbation shows
    assert metrics["rewards/chosen"] == pytest.approx(rewards[:4].mean().item(), rel=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(rewards[4:].mean().item(), rel=1e-4)


def test_dpo_explicit_ref_model_runs_after_the_policy(tiny_model_dir, preference_dataset, tmp_path):
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = trl.DPOTrainer(model=tiny_model_dir, ref_model=ref_model, train_dataset=preference_dataset,
                             args=make_config(trl.DPOConfig, tmp_path))
    batch = _batch(trainer, preference_dataset)
    trainer.model.train()
    with record_fused_outputs(trainer.accelerator, trainer.model, trainer.ref_model) as recorded:
        trainer._compute_loss(trainer.model, batch, return_outputs=False)
    assert [output.log_probs.requires_grad for output in recorded] == [True, False]


def test_sft_compute_loss_runs_one_fused_forward_with_gradient(tiny_model_dir, preference_dataset, tmp_path):
    dataset = preference_dataset.rename_column("chosen", "completion").remove_columns("rejected")
    trainer = trl.SFTTrainer(model=tiny_model_dir, train_dataset=dataset, args=make_config(trl.SFTConfig, tmp_path))
    batch = _batch(trainer, dataset)
    trainer.model.train()
    with record_fused_outputs(trainer.accelerator, trainer.model) as recorded:
        loss = trainer.compute_loss(trainer.model, batch)
    assert len(recorded) == 1 and recorded[0].log_probs.requires_grad
    assert recorded[0].log_probs.shape == (4, batch["input_ids"].size(1) - 1)
    # The loss TRL returns is the token mean of the recorded log-probs, on the completion labels
    torch.testing.assert_close(recorded[0].label_mask, batch["labels"][:, 1:] != -100)
    torch.testing.assert_close(loss, -recorded[0].log_probs.sum() / recorded[0].label_mask.sum())


def test_use_adapter_none_disables_the_adapter_and_a_name_selects_it(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
        model = get_peft_model(base, LORA)
        model.add_adapter("ref", model.peft_config["default"])
        for name, parameter in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                parameter.add_(0.1)
        adapted = model(input_ids=input_ids).logits
        with use_adapter(model, adapter_name=None):
            disabled = model(input_ids=input_ids).logits
        with use_adapter(model, adapter_name="ref"):  # a fresh adapter: zero B, the base model
            ref = model(input_ids=input_ids).logits
        restored = model(input_ids=input_ids).logits
    torch.testing.assert_close(disabled, base_logits)
    torch.testing.assert_close(ref, base_logits)
    assert not torch.allclose(adapted, base_logits)
    torch.testing.assert_close(restored, adapted)


def test_create_reference_model_is_a_frozen_copy(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = create_reference_model(model)
    assert reference is not model
    assert not any(parameter.requires_grad for parameter in reference.parameters())
    for (name, parameter), (_, copied) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(parameter, copied) and parameter.data_ptr() != copied.data_ptr(), name


def test_signature_columns_list_what_the_trainer_keeps(tiny_model_dir, preference_dataset, tmp_path):
    dataset = preference_dataset.rename_column("chosen", "completion").remove_columns("rejected")
    trainer = trl.SFTTrainer(model=tiny_model_dir, train_dataset=dataset, args=make_config(trl.SFTConfig, tmp_path))
    trainer._signature_columns = None
    trainer._set_signature_columns_if_needed()
    assert isinstance(trainer._signature_columns, list) and "input_ids" in trainer._signature_columns


@pytest.mark.parametrize("num_items_in_batch", [None, 40], ids=["no-num-items", "num-items"])
@pytest.mark.parametrize(("trainer_cls", "config_cls", "loss_type"), [
    (SFTTrainer, SFTConfig, "nll"), (SFTTrainer, SFTConfig, "kl_sft"), (DPOTrainer, DPOConfig, "dpop"),
], ids=["sft-nll", "sft-kl_sft", "dpo-dpop"])
def test_trainer_divides_the_loss_by_the_accumulation_steps_unless_it_is_scaled(
        tiny_model_dir, preference_dataset, tmp_path, trainer_cls, config_cls, loss_type, num_items_in_batch):
    """`loss_is_scaled_for_gradient_accumulation` predicts whether `Trainer.training_step` divides the loss by the
    accumulation steps, in every supported transformers (before 5.19, which added `Trainer.loss_is_scaled_for_ga`,
    TRL's base trainer maps it onto `model_accepts_loss_kwargs` and `compute_loss_func`): trl_ext divides its
    per-micro-batch means exactly when the Trainer does not."""
    steps = 4
    trainer = trainer_cls(model=tiny_model_dir, train_dataset=preference_dataset, args=make_config(
        config_cls, tmp_path, loss_type=loss_type, gradient_accumulation_steps=steps))
    trainer.current_gradient_accumulation_steps = steps  # what the training loop sets before each step
    inputs = next(iter(trainer.get_train_dataloader()))
    num_items = None if num_items_in_batch is None else torch.tensor(num_items_in_batch)
    stepped = trainer.training_step(trainer.model, inputs, num_items)  # the model has no dropout: same loss below
    computed = trainer.compute_loss(trainer.model, trainer._prepare_inputs(inputs), num_items_in_batch=num_items)
    divisor = 1 if trl_contract.loss_is_scaled_for_gradient_accumulation(trainer, num_items) else steps
    assert computed.item() > 0.1
    assert stepped.item() == pytest.approx(computed.item() / divisor, rel=1e-5)


@pytest.mark.parametrize(("trainer_cls", "config_cls", "text_columns"), [
    (trl.DPOTrainer, trl.DPOConfig, ("chosen", "rejected")), (trl.SFTTrainer, trl.SFTConfig, ("completion",)),
])
def test_prepared_datasets_keep_the_text_and_drop_the_rows_truncation_empties(tiny_model_dir, preference_dataset,
                                                                               tmp_path, trainer_cls, config_cls,
                                                                               text_columns):
    """`trl_ext.data_checks` counts the rows TRL's `_prepare_dataset` left out (those whose prompt fills
    `max_length`), and the empty completions among the rest in the text columns it keeps, with the EOS it appends."""
    dataset = preference_dataset
    if trainer_cls is trl.SFTTrainer:
        dataset = dataset.rename_column("chosen", "completion").remove_columns("rejected")
    for max_length, kept in ((None, len(dataset)), (4, 0)):
        trainer = trainer_cls(model=tiny_model_dir, train_dataset=dataset,
                              args=make_config(config_cls, tmp_path, max_length=max_length))
        prepared = trainer.train_dataset
        assert len(prepared) == kept
        assert set(text_columns) <= set(prepared.column_names)
        eos = trainer.processing_class.eos_token
        assert all(row[column] == dataset[index][column] + eos for index, row in enumerate(prepared)
                   for column in text_columns)


def test_trl_logs_the_mean_of_each_metric_list(tiny_model_dir, preference_dataset, tmp_path):
    trainer = trl.DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                             args=make_config(trl.DPOConfig, tmp_path))
    trainer.model.train()
    trainer._metrics["train"]["custom/value"].extend([1.0, 2.0, 6.0])
    trainer.log({"loss": 0.5})
    assert trainer.state.log_history[-1]["custom/value"] == pytest.approx(3.0)
    assert not trainer._metrics["train"]  # cleared after logging


def test_trl_dpo_logs_the_metrics_of_the_chosen_completions(tiny_model_dir, preference_dataset, tmp_path):
    """The metrics trl_ext drops when the chosen completion is its placeholder are TRL's names for them."""
    trainer = trl.DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                             args=make_config(trl.DPOConfig, tmp_path, max_steps=1))
    trainer.train()
    assert set(TRL_DPO_CHOSEN_METRICS) <= set(trainer.state.log_history[0])


def test_precomputed_reference_cache_is_keyed_by_the_model_hash(tiny_model_dir, preference_dataset, tmp_path):
    """sDPO precomputes again through `_precompute_ref_logps` after setting `_precompute_model_hash` to the new
    reference's `hash_module`: TRL's cache of the values is reused for the same hash, whatever the weights, and not
    for another."""
    trainer = trl.DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                             args=make_config(trl.DPOConfig, tmp_path, precompute_ref_log_probs=True))
    assert trainer._precompute_model_hash == hash_module(trainer.model)
    dataset = trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    before = trainer._precompute_ref_logps(dataset, "train", 4)["ref_chosen_logps"]
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.mul_(1.1)
    assert trainer._precompute_ref_logps(dataset, "train", 4)["ref_chosen_logps"] == before  # stale: same hash
    trainer._precompute_model_hash = hash_module(trainer.model)
    recomputed = trainer._precompute_ref_logps(dataset, "train", 4)
    batch = trainer._prepare_inputs(trainer.data_collator([recomputed[i] for i in range(4)]))
    expected, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    assert recomputed["ref_chosen_logps"][:4] == pytest.approx(expected.tolist(), abs=1e-5)
    assert recomputed["ref_chosen_logps"][:4] != pytest.approx(before[:4], abs=1e-3)


def _fused(shape, requires_grad=False):
    log_probs = torch.zeros(shape, requires_grad=requires_grad)
    return FusedCausalLMOutput(log_probs=log_probs, label_mask=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize(
    ("recorded", "message"),
    [
        ([_fused((8, 5), True)], r"expected to run 2 fused forward\(s\) \(policy, reference\), but ran 1"),
        ([_fused((8, 5), True), _fused((4, 5))], r"forward 2 \(reference\) has log-probs of shape \(4, 5\), "
                                                 r"expected \(8, >= 5\)"),
        ([_fused((8, 5)), _fused((8, 5))], r"forward 1 \(policy\) has no gradient"),
        ([_fused((8, 5), True), _fused((8, 5), True)], r"forward 2 \(reference\) has gradient"),
    ],
    ids=["count", "shape", "policy_without_gradient", "reference_with_gradient"],
)
def test_recorded_forwards_are_verified(recorded, message):
    expected = [ExpectedForward("policy", 8, 5, True), ExpectedForward("reference", 8, 5, False)]
    with pytest.raises(TRLContractError, match=message):
        check_recorded_forwards("trl.DPOTrainer._compute_loss", recorded, expected)


def test_unwrap_model_for_generation_yields_the_model_and_restores_checkpointing(tiny_model_dir):
    """GenerationEvalCallback generates from what this yields: the bare model, with gradient checkpointing off for
    the generation and back on after it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.gradient_checkpointing_enable()
    with unwrap_model_for_generation(model, Accelerator()) as unwrapped:
        assert unwrapped is model and not model.is_gradient_checkpointing
    assert model.is_gradient_checkpointing


def test_trl_env_prints_the_versions(capsys):
    print_trl_env()
    printed = capsys.readouterr().out
    assert f"- TRL version: {trl.__version__}" in printed
    assert f"- Transformers version: {transformers.__version__}" in printed


def test_model_card_cites_the_trainers_paper_dictionary(tiny_model_dir, preference_dataset, tmp_path):
    """trl_ext's trainers cite their losses by setting `_paper`, which TRL's `create_model_card` reads."""
    assert set(trl.DPOTrainer._paper) == set(trl_contract.MODEL_CARD_PAPER_KEYS)
    trainer = trl.DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                             args=make_config(trl.DPOConfig, tmp_path))
    trainer._paper = {"title": "A stand-in title", "id": "0000.00000", "citation": "@misc{stand_in}"}
    trainer.create_model_card(model_name="tiny", tags=["stand-in-tag"])
    card = (tmp_path / "README.md").read_text()
    assert "[A stand-in title](https://huggingface.co/papers/0000.00000)" in card
    assert "@misc{stand_in}" in card
    assert "- stand-in-tag\n" in card


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "peft"])
def test_fused_forward_runs_the_backbone_once_before_the_lm_head(tiny_model_dir, peft):
    """TDPO records the last hidden state of TRL's fused forwards on `lm_backbone(model)`: one per forward, and the
    LM head applied to it gives the fused log-probs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(model)
    if peft:
        model = get_peft_model(model, LORA)
    input_ids = torch.tensor([[1, 5, 9, 4, 7]])
    with trl_contract.record_last_hidden_states(Accelerator(), model) as hidden_states:
        output = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    assert len(hidden_states) == 1
    logits = model.get_output_embeddings()(hidden_states[0][:, :-1])
    expected = logits.log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    torch.testing.assert_close(output.log_probs, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed_before", [False, True], ids=["kept", "undone"])
def test_a_4bit_layer_stays_differentiable_after_a_forward_without_gradient(packed_before):
    """bitsandbytes repacks a 4-bit layer for a CPU inference kernel without backward after an eval forward without
    gradient (on AVX512-BF16 CPUs, such as CI's): the input's gradient would then be dropped."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4").to("cpu")

    def eval_forward():
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(4, 64))
        layer.train()

    if packed_before:
        eval_forward()
    trl_contract.keep_4bit_layers_differentiable(torch.nn.Sequential(layer))
    eval_forward()
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    inputs = torch.randn(4, 64, requires_grad=True)
    layer(inputs).sum().backward()
    torch.testing.assert_close(inputs.grad, torch.ones(4, 32) @ weight)
