"""The Penn experiment's configs: the fragments in recipes/configs/penn/ layered with `--config` and the command line
into the real TRL configs."""

from pathlib import Path

import pytest
import torch
import trl
from peft import LoraConfig

import trl_ext
from penn import config as penn_config
from penn.config import PennSetup, method_config
from penn.report import settings_summary
from penn_experiment import parse_args

ROOT = Path(__file__).resolve().parents[1]
# The default run as the README reports it: the loss fields each method's loss reads, and its trainer
LOSSES = {
    "sft": (trl_ext.SFTTrainer, {"loss_type": "nll"}),
    "kl_sft": (trl_ext.SFTTrainer, {"loss_type": "kl_sft", "kl_coef": 0.1, "kl_penalty": "sq_logratio"}),
    "ift": (trl_ext.SFTTrainer, {"loss_type": "ift", "ift_lambda": 0.2, "ift_gamma": 0.95}),
    "dpo": (trl_ext.DPOTrainer, {"loss_type": ["sigmoid_norm"], "beta": 0.1, "sdpo_stages": 1}),
    "dpop": (trl_ext.DPOTrainer, {"loss_type": ["dpop_norm"], "beta": 0.1, "dpop_lambda": 5.0}),
    "trl_dpo": (trl.DPOTrainer, {"loss_type": ["sigmoid"], "beta": 0.1}),
    "cdpo": (trl_ext.DPOTrainer, {"loss_type": ["cdpo"], "beta": 0.1, "label_smoothing": 0.1}),
    "rdpo": (trl_ext.DPOTrainer, {"loss_type": ["rdpo"], "beta": 0.1, "rdpo_alpha": 0.01}),
    "beta_dpo": (trl_ext.DPOTrainer, {"loss_type": ["beta_dpo"], "beta": 0.1, "beta_dpo_alpha": 0.5}),
    "npo": (trl_ext.DPOTrainer, {"loss_type": ["npo"], "beta": 0.1}),
    "tdpo1": (trl_ext.DPOTrainer, {"loss_type": ["tdpo1"], "beta": 0.1}),
    "tdpo2": (trl_ext.DPOTrainer, {"loss_type": ["tdpo2"], "beta": 0.1, "tdpo_alpha": 0.5}),
    "sdpo": (trl_ext.DPOTrainer, {"loss_type": ["sigmoid_norm"], "beta": 0.1, "sdpo_stages": 2}),
}
BUDGET = {"max_steps": 40, "per_device_train_batch_size": 8, "learning_rate": 6e-4, "lr_scheduler_type": "cosine",
          "max_length": None, "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 0,
          "gradient_checkpointing": False, "train_sampling_strategy": "sequential",
          "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}


def setup_of(argv: list[str]) -> PennSetup:
    (setup,) = parse_args(argv)
    return setup


def values(config, keys) -> dict:
    return {key: getattr(getattr(config, key), "value", getattr(config, key)) for key in keys}


def test_the_default_configs_are_the_reported_run():
    setup = setup_of(["--methods", *penn_config.TRAINED_METHODS])
    assert set(LOSSES) == set(penn_config.TRAINED_METHODS)
    for method, (trainer_cls, loss) in LOSSES.items():
        built_trainer, config = method_config(method, setup)
        assert built_trainer is trainer_cls, method
        assert type(config).__name__ == ("SFTConfig" if trainer_cls is trl_ext.SFTTrainer else "DPOConfig")
        assert isinstance(config, trl_ext.DPOConfig) == (trainer_cls is trl_ext.DPOTrainer), method
        assert values(config, loss) == loss, method
        assert values(config, BUDGET) == BUDGET, method
        # the DPO family is evaluated on the curve's held-out pairs at the curve's steps
        evaluated = {"eval_strategy": "steps", "eval_steps": 10} if method in penn_config.dpo_family() else {
            "eval_strategy": "no"}
        assert values(config, evaluated) == evaluated, method
        assert config.output_dir == f"outputs/penn/{method}/checkpoints"
    model = setup.model
    assert (model.model_name_or_path, model.use_peft) == ("embedded:smollm2-135m-instruct", True)
    lora = LoraConfig(r=model.lora_r, lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout,
                      target_modules=model.lora_target_modules, task_type="CAUSAL_LM")
    assert lora == LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                              task_type="CAUSAL_LM")
    assert penn_config.dpo_family() == ("dpo", "dpop", "trl_dpo", *penn_config.MORE_DPO_METHODS)


def test_quick_caps_the_steps():
    assert method_config("sft", setup_of(["--quick"]))[1].max_steps == 4
    assert method_config("sft", setup_of(["--quick", "--max_steps", "-1"]))[1].max_steps == 4


def test_a_field_goes_where_the_files_set_it_and_a_method_field_to_its_method():
    setup = setup_of(["--methods", "sft", "dpo", "dpop", "--beta", "0.2", "--dpop_lambda", "7", "--warmup_steps",
                      "3", "--dpop.beta=0.3", "--learning_rate", "1e-4"])
    sft, dpo, dpop = (method_config(method, setup)[1] for method in ("sft", "dpo", "dpop"))
    assert (dpo.beta, dpop.beta) == (0.2, 0.3)  # the method's own flag wins
    assert (dpo.dpop_lambda, dpop.dpop_lambda) == (trl_ext.DPOConfig.dpop_lambda, 7.0)  # dpo's file does not set it
    assert sft.warmup_steps == dpo.warmup_steps == dpop.warmup_steps == 3  # no file sets it: every config has it
    assert sft.learning_rate == dpo.learning_rate == 1e-4


def test_the_seeds_configs(tmp_path):
    for name, model, max_length in (("penn_seed", "embedded:smollm2-135m-instruct", None), ("penn_gpt2", "gpt2", 96)):
        setup = setup_of(["--config", str(ROOT / f"recipes/configs/{name}.yaml")])
        assert (setup.model.model_name_or_path, setup.model.use_peft) == (model, False)
        dpo, dpop = (method_config(method, setup)[1] for method in ("dpo", "dpop"))
        assert values(dpop, ["max_steps", "num_train_epochs", "per_device_train_batch_size", "learning_rate",
                             "lr_scheduler_type", "beta", "dpop_lambda", "max_length"]) == {
            "max_steps": -1, "num_train_epochs": 3, "per_device_train_batch_size": 16, "learning_rate": 1e-4,
            "lr_scheduler_type": "cosine", "beta": 0.1, "dpop_lambda": 5.0, "max_length": max_length}
        assert (dpo.loss_type, dpop.loss_type) == (["sigmoid_norm"], ["dpop_norm"])
    config = tmp_path / "mine.yaml"
    config.write_text("beta: 0.3\ndpop:\n  dpop_lambda: 50\n")
    setup = setup_of(["--config", str(config), "--methods", "dpo", "dpop", "--dpop_lambda", "9"])
    assert [method_config(method, setup)[1].beta for method in ("dpo", "dpop")] == [0.3, 0.3]
    assert method_config("dpop", setup)[1].dpop_lambda == 9  # the command line over the file's section


@pytest.mark.parametrize(("argv", "config", "error"), [
    (["--dpop_lamda", "7"], None, r"`--dpop_lamda`: `dpop_lamda` is not an experiment or model setting"),
    (["--sft.beta", "0.2"], None, r"`--sft.beta`: `beta` is not a field of trl_ext.SFTConfig"),
    (["--rlhf.beta", "0.2"], None, r"`rlhf` is not a trained method"),
    (["--dpop.seed", "3"], None, r"`seed` is an experiment-wide setting"),
    (["--dpop.loss_type", "no_such_loss"], None, r"no_such_loss"),
    ([], "dpop_lamda: 7\n", r"mine.yaml: `dpop_lamda` is not an experiment or model setting"),
    ([], "sft:\n  beta: 0.2\n", r"mine.yaml \(sft:\): `beta` is not a field of trl_ext.SFTConfig"),
], ids=["unknown-flag", "not-that-methods-field", "unknown-method", "experiment-field", "trl-refuses",
        "unknown-key", "not-that-sections-field"])
def test_unknown_fields_are_refused_naming_them(argv, config, error, tmp_path):
    if config is not None:
        (tmp_path / "mine.yaml").write_text(config)
        argv = ["--config", str(tmp_path / "mine.yaml"), *argv]
    with pytest.raises(ValueError, match=error):
        setup_of(argv)


def test_a_method_file_with_an_unknown_key_is_refused_naming_it(tmp_path, monkeypatch):
    for name in ("common", "dpo"):
        (tmp_path / f"{name}.yaml").write_text((penn_config.CONFIGS / f"{name}.yaml").read_text())
    (tmp_path / "dpo.yaml").write_text("trainer: trl_ext.DPOTrainer\nloss_type: [sigmoid_norm]\nbetta: 0.1\n")
    monkeypatch.setattr(penn_config, "CONFIGS", tmp_path)
    penn_config.method_file.cache_clear()
    try:
        with pytest.raises(ValueError, match=rf"{tmp_path / 'dpo.yaml'}: `betta` is not a field of trl_ext.DPOConfig"):
            penn_config.method_file("dpo")
    finally:
        penn_config.method_file.cache_clear()


@pytest.mark.parametrize("argv, order", [
    ([], "40 steps x batch 8 (length-grouped batches in a seeded order), lr 0.0006"),
    (["--train_sampling_strategy", "random"], "(random sampler)"),
])
def test_report_header_states_the_budget_and_row_order(argv, order):
    assert order in settings_summary(setup_of(argv), 125)


def test_no_curve_no_held_out_evaluation():
    assert method_config("dpop", setup_of(["--curve_prompts", "0"]))[1].eval_strategy == "no"
