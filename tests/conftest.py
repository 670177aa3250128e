import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from peft import LoraConfig

from trl_ext.testing import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
# Tests never reach a hub: they use models built here and the embedded model's local cache.
os.environ["HF_HUB_OFFLINE"] = "1"

OPENERS = [
    "The sun was setting over",
    "After a long week of classes",
    "My favourite place to study is",
    "Every autumn the students gather near",
    "She opened the letter and read that",
    "The old library smelled of",
    "On the train to Philadelphia",
    "His first research paper was about",
    "The rowing team practised at dawn on",
    "We met for coffee right next to",
    "The lecture on economics began with",
    "Walking down Locust Walk, I noticed",
    "The museum downtown displayed",
    "My grandmother always told stories about",
    "The new engineering building has",
    "At the graduation ceremony,",
]
CHOSEN = " the University of Pennsylvania, where the campus was busy."
REJECTED = " the quiet river, where the water was calm."


def preference_rows(n: int = 16) -> dict[str, list[str]]:
    prompts = [OPENERS[i % len(OPENERS)] for i in range(n)]
    return {"prompt": prompts, "chosen": [CHOSEN] * n, "rejected": [REJECTED] * n}


@pytest.fixture(scope="session")
def preference_dataset() -> Dataset:
    return Dataset.from_dict(preference_rows())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained on the test sentences, saved to disk."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), OPENERS + [CHOSEN, REJECTED])


def pytest_collection_modifyitems(items):
    # End-to-end tests (subprocesses, launchers, whole recipes) belong to the slow tier too: `-m "not slow"` is the
    # unit tier.
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
# Wall-clock and throughput entries differ between any two runs.
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
               "eval_samples_per_second", "eval_steps_per_second", "total_flos"}


def make_config(config_cls, tmp_path, **overrides):
    """A training config for the tiny model: CPU float32, a few logged steps, no saving, seeded."""
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return config_cls(**{**defaults, **overrides})


def train(trainer_cls, config_cls, model_dir, dataset, tmp_path, trainer_kwargs=None, **config):
    trainer = trainer_cls(
        model=model_dir, args=make_config(config_cls, tmp_path, **config), train_dataset=dataset,
        **(trainer_kwargs or {}),
    )
    trainer.train()
    return trainer


def step_logs(trainer, drop=frozenset()):
    """The per-step training logs, without timing entries and the keys in `drop`."""
    return [
        {key: value for key, value in entry.items() if key not in TIMING_KEYS | drop}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]


def free_port() -> int:
    """A local TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def multi_cpu_launcher(processes: int = 2) -> list[str]:
    """`accelerate launch` with `accelerate_configs/multi_cpu.yaml` on a free port: the default 29500 may still be
    held by the previous launch's processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs/multi_cpu.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(free_port())]


def run_dpo_script(launcher: list[str], script: list[str], model_dir: str, output_dir: Path, batch_size: int,
                   extra: tuple[str, ...] = ()) -> list[dict]:
    """The DPOP config on the tiny model for 3 steps, run by `launcher` (python, or accelerate launch) as `script` (a
    path, or `-m trl_ext.cli dpo`) with `extra` flags; the log history saved at the last step."""
    command = [*launcher, *script, "--config", str(ROOT / "recipes/configs/dpop_smollm2.yaml"),
               "--model_name_or_path", model_dir, "--lora_target_modules", "q_proj", "v_proj",
               "--learning_rate", "5e-3", "--max_steps", "3", "--logging_steps", "1",
               "--per_device_train_batch_size", str(batch_size), "--save_strategy", "steps", "--save_steps", "3",
               "--output_dir", str(output_dir), *extra]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
