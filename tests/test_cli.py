"""`trl-ext`: each subcommand parses its flags and runs a 2-step job; the console script is wired to `cli.main`;
`accelerate launch -m trl_ext.cli` on 2 CPU processes logs the generation scores of 1 process."""

import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch.distributed as dist

from trl_ext import cli

from .conftest import OPENERS, free_port, multi_cpu_launcher, run_dpo_script

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "recipes/data/penn_pairs_sample.jsonl")


def tiny_flags(tiny_model_dir, output_dir) -> list[str]:
    return ["--model_name_or_path", tiny_model_dir, "--dataset_name", SAMPLE, "--lora_target_modules", "q_proj",
            "v_proj", "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(output_dir)]


def train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_console_script_is_cli_main(capsys):
    """pyproject's `trl-ext` entry point names `trl_ext.cli:main` (installed by `pip install -e .`)."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["trl-ext"]
    module, function = target.split(":")
    assert getattr(importlib.import_module(module), function)(["env"]) == 0
    printed = capsys.readouterr().out
    assert "- trl_ext version: 0.1.0" in printed and "- TRL versions supported: <1.17,>=1.16" in printed
    assert "- TRL version: " in printed and "- PyTorch version: " in printed  # `trl env`'s report comes first


@pytest.mark.e2e
def test_the_package_alone_runs_every_command_it_lists(tmp_path):
    """A wheel holds `trl_ext/` and nothing of the repository: with only the package on the path (no recipes/, run
    from elsewhere), `trl-ext --help` lists commands that each run, and none that needs a checkout."""
    shutil.copytree(ROOT / "trl_ext", tmp_path / "trl_ext", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
        return result.stdout

    assert run("-c", "import trl_ext; print(trl_ext.__file__)").strip() == str(tmp_path / "trl_ext" / "__init__.py")
    listed = re.findall(r"^\s+trl-ext (\w+)", run("-m", "trl_ext.cli", "--help"), re.M)
    assert listed == list(cli.COMMANDS) and "penn" not in listed
    for command in listed:
        assert run("-m", "trl_ext.cli", command, "--help").strip(), command


def start_gloo_group() -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def test_a_command_ends_the_process_group_it_started():
    """A launched command's gloo group ends with its success (left to the interpreter's exit, its threads may abort the
    process), and one its caller started is left to the caller."""
    assert cli.run_command(start_gloo_group, tuple) == 0
    assert not dist.is_initialized()
    start_gloo_group()
    try:
        assert cli.run_command(dist.barrier, tuple) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("argv", [[], ["rlhf"]])
def test_unknown_subcommand_prints_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "trl-ext dpo --config file.yaml" in capsys.readouterr().err


def test_dpo_subcommand(tiny_model_dir, tmp_path):
    function, arguments = cli.parse_args(["dpo", "--config", str(ROOT / "recipes/configs/dpop_smollm2.yaml"),
                                          *tiny_flags(tiny_model_dir, tmp_path), "--beta", "0.2",
                                          "--eval_gen_steps", "1", "--eval_gen_prompts", "4",
                                          "--eval_gen_max_new_tokens", "4", "--eval_gen_pattern", "Penn"])
    script_args, training_args, model_args, generation_eval = arguments
    assert training_args.loss_type == ["dpop"] and training_args.dpop_lambda == 50.0  # the YAML
    assert training_args.beta == 0.2 and generation_eval.eval_gen_pattern == "Penn"  # flags over the YAML
    trainer = function(*arguments)
    logs = train_logs(trainer)
    assert len(logs) == 2 and logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts as a no-op
    scores = [entry for entry in trainer.state.log_history if "eval_gen/alignment_accuracy" in entry]
    assert [entry["step"] for entry in scores] == [0, 1, 2]
    assert {"eval_gen/repeated_3gram", "eval_gen/distinct_2"} <= set(scores[0])
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_sft_subcommand(tiny_model_dir, tmp_path):
    function, arguments = cli.parse_args(["sft", "--config", str(ROOT / "recipes/configs/kl_sft_smollm2.yaml"),
                                          *tiny_flags(tiny_model_dir, tmp_path)])
    assert arguments[1].loss_type == "kl_sft" and arguments[1].kl_coef == 0.1
    trainer = function(*arguments)
    logs = train_logs(trainer)
    assert len(logs) == 2 and logs[0]["kl/penalty"] == 0.0  # the policy is the reference before the first update
    assert logs[0]["loss"] == pytest.approx(logs[0]["kl/nll"])
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_generation_eval_needs_prompts(tiny_model_dir, tmp_path):
    text_data = tmp_path / "text.jsonl"
    text_data.write_text("".join(json.dumps({"text": opener}) + "\n" for opener in OPENERS))
    flags = tiny_flags(tiny_model_dir, tmp_path)
    flags[flags.index(SAMPLE)] = str(text_data)
    function, arguments = cli.parse_args(["sft", *flags, "--eval_gen_steps", "1"])
    with pytest.raises(ValueError, match=r"`--eval_gen_steps` generates from the dataset's `prompt` column"):
        function(*arguments)


@pytest.mark.e2e
def test_two_processes_log_the_generation_scores_of_one(tiny_model_dir, tmp_path):
    """`accelerate launch -m trl_ext.cli dpo`: 2 processes x 4 pairs against 1 x 8; the 7 prompts' completions (4
    batches of 2, split between the processes and gathered) are the same, and so are their scores."""
    accelerate = multi_cpu_launcher()
    script = ["-m", "trl_ext.cli", "dpo"]
    extra = ("--eval_gen_steps", "1", "--eval_gen_prompts", "7", "--eval_gen_batch_size", "2",
             "--eval_gen_max_new_tokens", "6", "--eval_gen_do_sample", "true", "--eval_gen_pattern", "the")
    runs = {name: [entry for entry in run_dpo_script(launcher, script, tiny_model_dir, tmp_path / name, batch_size,
                                                     extra) if "eval_gen/distinct_2" in entry]
            for name, launcher, batch_size in (("ddp", accelerate, 4), ("single", [sys.executable], 8))}
    assert [entry["step"] for entry in runs["ddp"]] == [entry["step"] for entry in runs["single"]] == [0, 1, 2, 3]
    for parallel_entry, single_entry in zip(runs["ddp"], runs["single"]):
        for key in ("eval_gen/alignment_accuracy", "eval_gen/repeated_3gram", "eval_gen/distinct_2"):
            assert parallel_entry[key] == pytest.approx(single_entry[key], abs=1e-6), key
    completions = [(tmp_path / name / "eval_generations.jsonl").read_text() for name in runs]
    assert completions[0] == completions[1] and len(completions[0].splitlines()) == 4 * 7
