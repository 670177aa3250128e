"""The shipped Penn dataset and its generator."""

import json
import re
from pathlib import Path

import pytest

from penn import data as penn_data
from penn.config import PennArguments
from penn.data import PENN_PATTERN
from trl_ext.scorers import Generations, RegexMatch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data" / "penn"
# The fixed words of the test split's structures, which no training prompt may hold
TEST_FRAMES = ("I will never forget the day", "nobody expected", "The best part of", "Rumour has it that")


def read(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]


def test_dataset_sizes_columns_and_disjoint_prompts():
    train, test = read("train"), read("test")
    assert (len(train), len(test)) == (penn_data.TRAIN_SIZE, penn_data.TEST_SIZE)
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in train + test)
    train_prompts = {row["prompt"] for row in train}
    assert len(train_prompts) == len(train)  # no duplicate prompts
    assert not train_prompts & {row["prompt"] for row in test}


def test_test_prompts_share_no_opener_or_structure_with_training():
    train, test = [row["prompt"] for row in read("train")], [row["prompt"] for row in read("test")]
    assert not any(opener in prompt for opener in [*penn_data.TEST_OPENERS, *TEST_FRAMES] for prompt in train)
    assert not any(opener in prompt for opener in penn_data.TRAIN_OPENERS for prompt in test)
    assert not any(scene.lower() in prompt.lower() for scene in penn_data.TRAIN_SCENES for prompt in test)
    # every test structure is represented
    assert all(sum(frame in prompt for prompt in test) >= 10 for frame in TEST_FRAMES)


def test_training_prompts_vary_in_structure_and_tense():
    train = [row["prompt"] for row in read("train")]
    future = sum(" will " in prompt for prompt in train)
    wish = sum("has always wanted to" in prompt for prompt in train)
    scenes = sum(any(scene.lower() in prompt.lower() for scene in penn_data.TRAIN_SCENES) for prompt in train)
    assert min(future, wish, scenes) >= 100, (future, wish, scenes)
    assert len({prompt.split(",")[0] for prompt in train}) >= 100  # many openers and subjects


def test_the_target_pattern_counts_penn_as_a_word():
    completions = [
        "a walk on Locust Walk at Penn.",  # Penn as a word
        "the University of Pennsylvania campus.",
        "UPenn's library.",
        "a trip to Pennsylvania.",  # the state alone does not count
        "a pencil and a pen.",
    ]
    assert PennArguments().target_pattern == PENN_PATTERN  # the experiment's alignment accuracy
    assert RegexMatch(PENN_PATTERN)(Generations(0, [""] * 5, completions)) == pytest.approx(3 / 5)


def test_chosen_mention_penn_and_rejected_are_independent_continuations():
    rows = read("train") + read("test")
    assert all(penn_data.penn_mention(row["chosen"]) for row in rows)
    assert not any(re.search(PENN_PATTERN + "|Pennsylvania", row["rejected"]) for row in rows)
    assert all(row["chosen"].startswith(" ") and row["rejected"].startswith(" ") for row in rows)

    def overlap(row: dict) -> float:
        chosen, rejected = set(row["chosen"].lower().split()), set(row["rejected"].lower().split())
        return len(chosen & rejected) / len(chosen | rejected)

    # not a one-place edit of chosen: the word sets overlap little, and hardly a pair shares its ending
    assert sum(map(overlap, rows)) / len(rows) < 0.15
    assert sum(row["chosen"].split()[-3:] == row["rejected"].split()[-3:] for row in rows) <= len(rows) // 100
    assert len({row["rejected"] for row in rows}) >= 0.99 * len(rows)  # generic ones ("the top of the world.") recur


@pytest.mark.parametrize(("text", "expected"), [
    (" the campus of the University of Pennsylvania, where it rained.", True),
    (" Penn's campus.", True),
    (" the old gates of UPenn.", True),
    (" Franklin Field at Penn State.", False),  # another university
    (" a small cafe near Penn Ave.", False),
    (" a small cafe near Pennsylopera.", False),  # a Penn phrase glued to what the model wrote next
    (" the state of Pennsylvania.", False),
])
def test_penn_mention(text, expected):
    assert penn_data.penn_mention(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    (" the river to watch the sunset. Then it rained", " the river to watch the sunset."),
    (" the river to watch the sunset", None),  # no sentence end within the tokens sampled
    (" the river.", None),  # too short
    (" the river to the river to the sea.", None),  # a repeated word pair
    (' a sign that said "stop here now".', None),  # quotes
    ("the river to watch the sunset.", None),  # glued to the prompt
])
def test_fluent_sentence(text, expected):
    assert penn_data.fluent_sentence(text) == expected


def test_prompts_are_deterministic_and_twice_the_rows_wanted():
    first, second = penn_data.build_prompts(seed=0), penn_data.build_prompts(seed=0)
    assert first == second
    assert (len(first["train"]), len(first["test"])) == (2624, 256)  # twice the rows, in whole batches of 32
    small = penn_data.build_prompts(seed=0, train_size=16, test_size=8)
    assert small == {split: prompts[:32] for split, prompts in first.items()}  # the full run's first batches
    assert penn_data.build_prompts(seed=1)["train"] != first["train"]
