"""What a new user types that trl_ext refuses before training, as they would type it: the Python API on the tiny
model, the command line in-process (`trl_ext.cli.main`, its stderr and exit status). Each refusal names the field,
flag or row, what was found and the fix."""

import math
import re

import pytest
import trl

from trl_ext import DPOConfig, DPOTrainer, SFTConfig, registered_dpo_losses
from trl_ext.trl_contract import TRL_DPO_LOSS_TYPES

from .conftest import make_config

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
