"""`trl_ext.SFTTrainer` against `trl.SFTTrainer` on a tiny random Llama (seconds on CPU)."""

import pytest
import trl
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_ext import SFTConfig, SFTTrainer

from .test_dpo_trainer import TIMING_KEYS, make_config

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
KL_KEYS = {"kl/penalty", "kl/nll", "logps/policy", "logps/ref"}


def train(trainer_cls, config_cls, model_dir, dataset, tmp_path, trainer_kwargs=None, **config):
    trainer = trainer_cls(model=model_dir, args=make_config(config_cls, tmp_path, **config), train_dataset=dataset,
                          **(trainer_kwargs or {}))
    trainer.train()
    return trainer


def step_logs(trainer, drop=frozenset()):
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS | drop}
            for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_trl_loss_types_match_trl(tiny_model_dir, preference_dataset, tmp_path, loss_type):
    dataset = preference_dataset.rename_column("chosen", "completion").remove_columns("rejected")
    ours = train(SFTTrainer, SFTConfig, tiny_model_dir, dataset, tmp_path / "ours", loss_type=loss_type)
    theirs = train(trl.SFTTrainer, trl.SFTConfig, tiny_model_dir, dataset, tmp_path / "trl", loss_type=loss_type)
    assert len(step_logs(ours)) == 3
    assert step_logs(ours) == step_logs(theirs)


def test_preference_dataset_trains_on_chosen(tiny_model_dir, preference_dataset, tmp_path):
    ours = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "ours")
    prompt_completion = preference_dataset.rename_column("chosen", "completion").remove_columns("rejected")
    theirs = train(trl.SFTTrainer, trl.SFTConfig, tiny_model_dir, prompt_completion, tmp_path / "trl")
    assert step_logs(ours) == step_logs(theirs)
    assert "rejected" not in ours.train_dataset.column_names


@pytest.mark.parametrize("kl_penalty", ["sq_logratio", "token_kl"])
def test_kl_coef_zero_is_nll(tiny_model_dir, preference_dataset, tmp_path, kl_penalty):
    ours = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "ours",
                 loss_type="kl_sft", kl_coef=0.0, kl_penalty=kl_penalty)
    theirs = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "nll", loss_type="nll")
    assert step_logs(ours, drop=KL_KEYS) == step_logs(theirs)


@pytest.mark.parametrize("kl_penalty", ["sq_logratio", "token_kl"])
@pytest.mark.parametrize("reference", ["frozen_copy", "peft_adapter_disabled", "explicit_ref_model"])
def test_kl_sft_trains_with_each_reference(tiny_model_dir, preference_dataset, tmp_path, kl_penalty, reference):
    trainer_kwargs = {}
    if reference == "peft_adapter_disabled":
        trainer_kwargs["peft_config"] = LORA
    if reference == "explicit_ref_model":
        trainer_kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path, trainer_kwargs,
                    loss_type="kl_sft", kl_penalty=kl_penalty, kl_coef=1.0, learning_rate=1e-2, max_steps=6)
    assert (trainer.ref_model is None) == (reference == "peft_adapter_disabled")
    logs = step_logs(trainer)
    # The reference is the initial policy: no penalty at the first step, and the loss is the NLL alone
    assert logs[0]["kl/penalty"] == pytest.approx(0.0, abs=1e-8)
    assert logs[0]["logps/policy"] == pytest.approx(logs[0]["logps/ref"], abs=1e-5)
    assert logs[0]["loss"] == pytest.approx(logs[0]["kl/nll"], rel=1e-5)
    assert logs[-1]["kl/penalty"] > 0
    assert logs[-1]["kl/nll"] < logs[0]["kl/nll"]
    assert logs[-1]["logps/ref"] == pytest.approx(logs[0]["logps/ref"], rel=0.02)  # the reference stays frozen


def test_kl_sft_penalty_holds_policy_closer_to_reference(tiny_model_dir, preference_dataset, tmp_path):
    common = dict(loss_type="kl_sft", learning_rate=1e-2, max_steps=6)
    free = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "free", kl_coef=0.0, **common)
    held = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "held", kl_coef=5.0, **common)
    assert step_logs(held)[-1]["kl/penalty"] < 0.5 * step_logs(free)[-1]["kl/penalty"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"loss_type": "kl_sft", "kl_coef": -0.1}, r"`kl_coef` must be >= 0, got -0.1"),
        ({"loss_type": "kl_sft", "kl_penalty": "forward_kl"}, r"Unknown `kl_penalty` 'forward_kl'. Valid values: \['sq_logratio', 'token_kl'\]"),
        ({"loss_type": "klsft"}, r"Unknown `loss_type` 'klsft'. Valid values: \['nll', 'dft', 'kl_sft'"),
    ],
)
def test_bad_config_is_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        make_config(SFTConfig, tmp_path, **config)
