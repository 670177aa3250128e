import os

import pytest
from datasets import Dataset
from peft import LoraConfig

from trl_ext.testing import build_tiny_llama

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
