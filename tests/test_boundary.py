"""The prompt/completion boundary: TRL joins `prompt + completion` as written, so data whose completions start
without a space (the seed Penn data's shape) would train on glued words."""

import json
import logging

import pytest
from datasets import Dataset

from penn.config import PennArguments
from penn.experiment import load_splits
from trl_ext import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl_ext.data import glues_words, prepare_preference_pairs, space_completions
from trl_ext.scripts.common import ScriptArguments, load_train_and_eval

from .conftest import make_config

# The seed's own example row: its completions start without a space.
SEED_ROW = {"prompt": "The sun was setting over", "chosen": "the beautiful campus of the University of Pennsylvania.",
            "rejected": "the quiet hills behind the old farmhouse."}
SPACED_ROW = {"prompt": "After a long week of classes", "chosen": " we walked to Penn.", "rejected": " we slept."}


@pytest.mark.parametrize("prompt, completion, glued", [
    ("The sun was setting over", "the campus", True),
    ("Question:", "Yes", True),  # punctuation the next word should follow after a space
    ("It ended.", "Then", True),
    ("The sun was setting over ", "the campus", False),
    ("The sun was setting over", " the campus", False),
    ("The sun was setting over", "\nthe campus", False),
    ("The value of pi is 3.", "14", False),  # a decimal point
    ("total = 1", "00 + x", False),  # a number split between the two
    ("return self.val", "ue", True),  # a word split on purpose looks the same: `--space_completions false`
    ("He said \"", "hello", False),
    ("The price is $", "5", False),
    ("我们在", "大学学习", False),  # written without spaces
    ("", "the campus", False),
    ("The sun was setting over", "", False),
    ("Das Haus am", "Ufer", True),
    ("Café", "éclair", True),
])
def test_glues_words(prompt, completion, glued):
    assert glues_words(prompt, completion) is glued


def test_space_completions_separates_only_glued_completions():
    assert space_completions(SEED_ROW) == {**SEED_ROW, "chosen": " " + SEED_ROW["chosen"],
                                           "rejected": " " + SEED_ROW["rejected"]}
    assert space_completions(SPACED_ROW) == SPACED_ROW
    mixed = {"prompt": "Question:", "completion": "Yes", "chosen": " No"}
    assert space_completions(mixed) == {"prompt": "Question:", "completion": " Yes", "chosen": " No"}
    conversational = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yo"}]}
    assert space_completions(conversational) == conversational


@pytest.mark.parametrize("space", [True, False])
def test_the_scripts_space_completions_and_say_how_many(tmp_path, caplog, space):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [SEED_ROW] * 3 + [SPACED_ROW] * 2))
    script_args = ScriptArguments(dataset_name=str(path), space_completions=space)
    with caplog.at_level(logging.WARNING, logger="trl_ext.scripts.common"):
        train, _ = load_train_and_eval(script_args, make_config(DPOConfig, tmp_path))
    expected = [space_completions(SEED_ROW) if space else SEED_ROW] * 3 + [SPACED_ROW] * 2
    assert train.to_list() == expected
    messages = [record.getMessage() for record in caplog.records if record.name == "trl_ext.scripts.common"]
    assert messages == ([
        "Started 3 of 5 rows' completions of the train split with a space: they ran into the prompt's last word "
        "(e.g. '...The sun was setting overthe beautiful campus of ...'). `--space_completions false` trains on the "
        "text as written."] if space else [])


def glue_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "trl_ext.data" and "without a space" in record.getMessage()]


def test_dpo_trainer_warns_once_with_the_count_and_the_fix(tiny_model_dir, tmp_path, caplog):
    rows = [SEED_ROW] * 3 + [SPACED_ROW] * 2
    dataset = Dataset.from_list(rows)
    with caplog.at_level(logging.WARNING, logger="trl_ext.data"):
        trainer = DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path), train_dataset=dataset)
    (message,) = glue_warnings(caplog)
    assert message.startswith("3 of 5 rows of the train dataset join prompt and completion without a space")
    assert "(e.g. '...The sun was setting overthe beautiful campus of ...')" in message
    assert "dataset.map(trl_ext.data.space_completions)" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_ext.data"):
        DPOTrainer(model=trainer.model, args=make_config(DPOConfig, tmp_path),
                   train_dataset=dataset.map(space_completions), processing_class=trainer.processing_class)
    assert glue_warnings(caplog) == []


def test_sft_trainer_warns_on_glued_prompt_completion_rows(tiny_model_dir, tmp_path, caplog):
    dataset = Dataset.from_list([{"prompt": SEED_ROW["prompt"], "completion": SEED_ROW["chosen"]},
                                 {"prompt": SPACED_ROW["prompt"], "completion": SPACED_ROW["chosen"]}])
    with caplog.at_level(logging.WARNING, logger="trl_ext.data"):
        SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path), train_dataset=dataset)
    (message,) = glue_warnings(caplog)
    assert message.startswith("1 of 2 rows of the train dataset")


def test_penn_recipe_trains_seed_format_data_on_separated_words(tiny_model_dir, tmp_path):
    data = tmp_path / "seed"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps(SEED_ROW) + "\n" + json.dumps(SPACED_ROW) + "\n")
    train = load_splits(PennArguments(dataset_name=str(data)))["train"]
    assert train[0]["prompt"] + train[0]["chosen"] == ("The sun was setting over the beautiful campus of the "
                                                       "University of Pennsylvania.")
    assert train[1] == SPACED_ROW
    # What the trainer tokenizes is the separated text.
    trainer = DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path / "out"), train_dataset=train)
    row = trainer.train_dataset[0]
    text = trainer.processing_class.decode(row["prompt_ids"] + row["chosen_ids"])
    assert "setting over the beautiful campus" in text


def test_llama2_pair_preparation_separates_glued_completions(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared = prepare_preference_pairs(Dataset.from_list([SEED_ROW]), tokenizer, max_prompt_tokens=None,
                                        max_length=None)
    assert prepared.to_list() == [space_completions(SEED_ROW)]
