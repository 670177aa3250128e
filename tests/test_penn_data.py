"""The shipped Penn dataset."""

import json
import re
from pathlib import Path

from recipes import penn_data
from trl_ext.scorers import PENN_PATTERN

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data" / "penn"


def read(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]


def test_dataset_sizes_columns_and_disjoint_prompts():
    train, test = read("train"), read("test")
    assert len(train) >= 1300 and len(test) >= 125
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in train + test)
    train_prompts = {row["prompt"] for row in train}
    assert len(train_prompts) == len(train)  # no duplicate prompts
    assert not train_prompts & {row["prompt"] for row in test}
    assert not any(row["prompt"].endswith("?") for row in train + test)  # sentence openers, not questions


def test_every_chosen_mentions_penn_and_no_rejected_does():
    rows = read("train") + read("test")
    assert all(re.search(PENN_PATTERN, row["chosen"]) for row in rows)
    assert not any(re.search(PENN_PATTERN, row["rejected"]) for row in rows)
    assert len({row["chosen"] for row in rows}) > 500  # many wordings, places and clauses


def test_shipped_files_match_the_generator(tmp_path):
    generated = penn_data.generate(seed=0)
    assert generated["train"] == read("train") and generated["test"] == read("test")

