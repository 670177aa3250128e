"""What a new user types that trl_ext refuses before training, as they would type it: the Python API on the tiny
model, the command line in-process (`trl_ext.cli.main`, its stderr and exit status). Each refusal names the field,
flag or row, what was found and the fix."""

import logging
import math
import re

import pytest
import trl
from datasets import Dataset
from transformers import AutoTokenizer

from trl_ext import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer, registered_dpo_losses
from trl_ext.trl_contract import TRL_DPO_LOSS_TYPES

from .conftest import make_config, preference_rows

BETA_READERS = [name for name in TRL_DPO_LOSS_TYPES + registered_dpo_losses() if name != "sft"]


# Case 1 and 2: beta <= 0 trained silently (the opposite preference, or nothing).
@pytest.mark.parametrize("beta", [-1.0, 0.0])
@pytest.mark.parametrize("loss_type", BETA_READERS)
def test_beta_must_be_positive_for_every_loss_that_reads_it(tmp_path, loss_type, beta):
    with pytest.raises(ValueError, match=rf"^`beta` must be > 0 for `{loss_type}`, got {beta}: it scales the "
                                         r"preference margin .* Use a positive value, e.g. 0.1"):
        make_config(DPOConfig, tmp_path, loss_type=loss_type, beta=beta)


def test_sft_alone_reads_no_beta(tmp_path):
    assert make_config(DPOConfig, tmp_path, loss_type="sft", beta=0.0).beta == 0.0
    with pytest.raises(ValueError, match=r"`beta` must be > 0 for `sigmoid`, got 0.0"):
        make_config(DPOConfig, tmp_path, loss_type=["sft", "sigmoid"], beta=0.0)


def test_trl_config_with_negative_beta_is_refused_by_the_trainer(tiny_model_dir, preference_dataset, tmp_path):
    """TRL's own config accepts it; trl_ext's trainer, a drop-in for TRL's, does not."""
    args = make_config(trl.DPOConfig, tmp_path, beta=-1.0)
    with pytest.raises(ValueError, match=r"`beta` must be > 0 for `sigmoid`, got -1.0"):
        DPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset)


# Case 5 (and the other counts transformers accepts), case 11: at config construction.
@pytest.mark.parametrize("config_cls", [DPOConfig, SFTConfig])
@pytest.mark.parametrize(("field", "value", "message"), [
    ("per_device_train_batch_size", 0, r"`per_device_train_batch_size` must be an integer >= 1, got 0: set it to 1"),
    ("per_device_eval_batch_size", 0, r"`per_device_eval_batch_size` must be an integer >= 1, got 0"),
    ("gradient_accumulation_steps", 0, r"`gradient_accumulation_steps` must be an integer >= 1, got 0"),
    ("max_length", 0, r"`max_length` must be an integer >= 1 or None \(no truncation\), got 0"),
    ("learning_rate", -1e-4, r"`learning_rate` must be a finite number >= 0, got -0.0001: a negative one would climb"),
    ("learning_rate", math.nan, r"`learning_rate` must be a finite number >= 0, got nan"),
])
def test_unusable_training_fields_are_refused_at_construction(tmp_path, config_cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(config_cls, tmp_path, **{field: value})


@pytest.mark.parametrize("config_cls", [DPOConfig, SFTConfig])
def test_output_dir_that_is_a_file_is_refused(tmp_path, config_cls):
    existing = tmp_path / "model.bin"
    existing.write_text("")
    with pytest.raises(ValueError, match=rf"`output_dir` is '{re.escape(str(existing))}', an existing file: "
                                         r"checkpoints and the trained model are saved in a directory"):
        config_cls(output_dir=str(existing))


# Case 3: empty completions trained with gradient norm 0.
def _rows_with_empty_completions(count: int, columns=("chosen", "rejected")) -> Dataset:
    rows = preference_rows()
    for column in columns:
        rows[column] = [""] * count + rows[column][count:]
    return Dataset.from_dict(rows)


def test_empty_completions_are_refused_when_most_rows_have_one(tiny_model_dir, tmp_path):
    dataset = _rows_with_empty_completions(16)
    with pytest.raises(ValueError, match=r"^16 of 16 rows of the train dataset have no completion to learn from: 16 "
                                         r"have an empty completion \(e.g. `chosen` of row 0\)\. That is more than "
                                         r"half of the rows, so training is refused: fill or drop the rows"):
        DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="dpop"),
                   train_dataset=dataset)
    # SFT learns a preference dataset's `chosen` as its `completion`
    with pytest.raises(ValueError, match=r"^9 of 16 rows of the train dataset have no completion to learn from: 9 "
                                         r"have an empty completion \(e.g. `completion` of row 0\)"):
        SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path, loss_type="kl_sft"),
                   train_dataset=_rows_with_empty_completions(9, ("chosen",)))


def test_a_few_empty_completions_are_a_warning(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_ext.data_checks"):
        DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="dpop"),
                   train_dataset=_rows_with_empty_completions(3, ("rejected",)))
    (warning,) = [record.getMessage() for record in caplog.records if record.name == "trl_ext.data_checks"]
    assert warning.startswith("3 of 16 rows of the train dataset have no completion to learn from: 3 have an empty "
                              "completion (e.g. `rejected` of row 0). Training goes on with the others")


def test_empty_chat_completions_are_counted(tiny_model_dir, tmp_path):
    rows = preference_rows()
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": text}] for text in rows["prompt"]],
        "chosen": [[{"role": "assistant", "content": text}] for text in rows["chosen"]],
        "rejected": [[{"role": "assistant", "content": " "}] for _ in rows["rejected"]],
    })
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match=r"16 have an empty completion \(e.g. `rejected` of row 0\)"):
        DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path), train_dataset=dataset,
                   processing_class=tokenizer)


# Case 4: every row dropped by truncation, then `num_samples=0`.
@pytest.mark.parametrize(("trainer_cls", "config_cls"), [(DPOTrainer, DPOConfig), (SFTTrainer, SFTConfig)])
def test_truncation_that_leaves_no_completion_is_refused(tiny_model_dir, preference_dataset, tmp_path, trainer_cls,
                                                         config_cls):
    with pytest.raises(ValueError, match=r"^16 of 16 rows of the train dataset have no completion to learn from: 16 "
                                         r"have no completion token left after truncation to `max_length=4` \(the "
                                         r"prompt alone fills it; TRL drops them\)\. .* raise `max_length` above"):
        trainer_cls(model=tiny_model_dir, args=make_config(config_cls, tmp_path, max_length=4),
                    train_dataset=preference_dataset)


# Case 10: an empty in-memory dataset (a bare StopIteration), None in a cell (`'NoneType' ... 'endswith'`).
@pytest.mark.parametrize(("trainer_cls", "config_cls"), [(DPOTrainer, DPOConfig), (SFTTrainer, SFTConfig)])
def test_empty_dataset_and_missing_values_are_named(tiny_model_dir, tmp_path, trainer_cls, config_cls):
    args = make_config(config_cls, tmp_path)
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match=r"^The train dataset is empty \(0 rows, columns \['prompt', 'chosen', "
                                         r"'rejected'\]\): give it at least one row"):
        trainer_cls(model=tiny_model_dir, args=args, train_dataset=empty)
    rows = preference_rows()
    rows["rejected"][3] = None
    with pytest.raises(ValueError, match=r"^The eval dataset has no value \(None\) in `rejected` at row 3: fill it or "
                                         r"drop the row, e.g. `dataset = dataset.filter\(lambda row: "
                                         r"row\['rejected'\] is not None\)`"):
        trainer_cls(model=tiny_model_dir, args=args, train_dataset=Dataset.from_dict(preference_rows()),
                    eval_dataset=Dataset.from_dict(rows))
