import os
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from trl_ext.testing import build_tiny_llama

# Tests never reach a hub: they use models built here and the embedded model's local cache.
os.environ["HF_HUB_OFFLINE"] = "1"
# The recipes import their sibling modules, as when run as `python recipes/<name>.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

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
