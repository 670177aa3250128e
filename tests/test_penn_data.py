"""The shipped Penn dataset and the text metrics the Penn experiment reports."""

import json
import re
from pathlib import Path

import pytest

from recipes import penn_data
from trl_ext.text_metrics import (
    PENN_PATTERN,
    alignment_accuracy,
    distinct_n,
    mean_length,
    mean_repeated_ngram_share,
    repeated_ngram_share,
)

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


def test_alignment_accuracy():
    completions = [
        "a walk on Locust Walk at Penn.",  # Penn as a word
        "the University of Pennsylvania campus.",
        "UPenn's library.",
        "a trip to Pennsylvania.",  # the state alone does not count
        "a pencil and a pen.",
    ]
    assert alignment_accuracy(completions) == pytest.approx(3 / 5)
    assert alignment_accuracy(completions, pattern=r"pen\b") == pytest.approx(1 / 5)
    assert alignment_accuracy([]) == 0.0


def test_repetition_and_diversity():
    # 3-grams of "a b a b a b": aba bab aba bab -> 2 distinct of 4 -> half are repeats
    assert repeated_ngram_share("a b a b a b") == pytest.approx(0.5)
    assert repeated_ngram_share("one two three four") == 0.0
    assert repeated_ngram_share("too short") == 0.0
    assert mean_repeated_ngram_share(["a b a b a b", "one two three four"]) == pytest.approx(0.25)
    # 2-grams pooled: (x y)(y z) + (x y)(y w) -> 3 distinct of 4
    assert distinct_n(["x y z", "x y w"]) == pytest.approx(0.75)
    assert mean_length(["one two", "one two three four"]) == 3.0
