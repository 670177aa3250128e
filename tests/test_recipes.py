"""The recipes, run in-process through their `TrlParser` as `python recipes/<name>.py ...` would."""

import importlib
import math
import sys
from pathlib import Path

import pytest

from trl_ext.scripts.common import reward_summary

from .conftest import multi_cpu_launcher, run_dpo_script

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str):
    return importlib.import_module(name)  # recipes/ is on the tests' path, as on a script's


def parse(args: list[str]):
    """What `python recipes/dpo.py ARGS` passes to `main`."""
    return load_recipe("dpo").parse_args(args)


def test_dpo_recipe_on_tiny_model(tiny_model_dir, tmp_path):
    recipe = load_recipe("dpo")
    trainer = recipe.main(*parse([
        "--config", str(ROOT / "recipes/configs/dpop_smollm2.yaml"),
        "--model_name_or_path", tiny_model_dir,
        "--dataset_name", str(ROOT / "recipes/data/penn_pairs_sample.jsonl"),
        "--lora_target_modules", "q_proj", "v_proj",
        "--max_steps", "3", "--logging_steps", "1", "--output_dir", str(tmp_path),
    ]))
    assert trainer.args.loss_type == ["dpop"] and trainer.args.dpop_lambda == 50.0  # from the YAML
    assert (tmp_path / "adapter_model.safetensors").exists()
    summary = reward_summary(trainer.state.log_history)
    assert summary.splitlines()[0].split() == ["metric", "step", "1", "step", "3"]
    assert "dpop/penalty" in summary


def test_eval_without_test_split_is_refused(tiny_model_dir, tmp_path):
    recipe = load_recipe("dpo")
    with pytest.raises(ValueError, match=r"no `test` split .* set `--dataset_test_split`"):
        recipe.main(*parse([
            "--model_name_or_path", tiny_model_dir,
            "--dataset_name", str(ROOT / "recipes/data/penn_pairs_sample.jsonl"),
            "--eval_strategy", "steps", "--bf16", "false", "--output_dir", str(tmp_path),
        ]))


@pytest.mark.slow
def test_dpop_lora_on_embedded_model(tmp_path):
    recipe = load_recipe("dpo")
    trainer = recipe.main(*parse([
        "--config", str(ROOT / "recipes/configs/dpop_smollm2.yaml"),
        "--max_steps", "4", "--logging_steps", "1", "--learning_rate", "5e-4", "--output_dir", str(tmp_path),
    ]))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    # LoRA starts as a no-op, so the first step's policy is the reference: zero rewards, loss log 2
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.1
    assert {"dpop/penalty", "dpop/active", "logps/chosen"} <= set(logs[-1])
    assert (tmp_path / "adapter_model.safetensors").exists()


def _run_dpo_recipe(launcher: list[str], model_dir: str, output_dir: Path, batch_size: int) -> list[dict]:
    history = run_dpo_script(launcher, [str(ROOT / "recipes/dpo.py")], model_dir, output_dir, batch_size)
    return [entry for entry in history if "loss" in entry]


@pytest.mark.e2e
def test_dpop_two_process_data_parallel_matches_single_process(tiny_model_dir, tmp_path):
    """2 ranks x 4 pairs see the same global batch as 1 rank x 8: same metrics, averaged across ranks."""
    accelerate = multi_cpu_launcher()
    parallel = _run_dpo_recipe(accelerate, tiny_model_dir, tmp_path / "ddp", batch_size=4)
    single = _run_dpo_recipe([sys.executable], tiny_model_dir, tmp_path / "single", batch_size=8)
    assert len(parallel) == len(single) == 3
    for parallel_entry, single_entry in zip(parallel, single):
        assert parallel_entry["num_tokens"] == single_entry["num_tokens"]  # both ranks stepped
        for key in ("loss", "rewards/chosen", "rewards/margins", "dpop/penalty", "dpop/active"):
            assert parallel_entry[key] == pytest.approx(single_entry[key], rel=1e-3, abs=1e-5), key
