"""Combinations trl_ext cannot honour are refused before training, naming the field and the fix."""

import math

import pytest
import torch
from datasets import Dataset

from trl_ext import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .conftest import make_config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"loss_type": []}, r"`loss_type` is empty: name at least one loss"),
        ({"loss_type": "dpop", "dpop_lambda": math.nan}, r"`dpop_lambda` must be a finite number >= 0, got nan"),
        ({"loss_type": "dpop", "dpop_lambda": math.inf}, r"`dpop_lambda` must be a finite number >= 0, got inf"),
        ({"loss_type": "dpop", "beta": math.nan}, r"`beta` must be a finite number, got nan"),
        ({"loss_type": ["dpop", "sft"], "loss_weights": [1.0, math.inf]},
         r"`loss_weights\[1\]` must be a finite number, got inf"),
    ],
    ids=["empty_loss_type", "nan_dpop_lambda", "inf_dpop_lambda", "nan_beta", "inf_loss_weight"],
)
def test_dpo_config_refusals(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        make_config(DPOConfig, tmp_path, **config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"loss_type": "kl_sft", "kl_coef": math.nan}, r"`kl_coef` must be a finite number >= 0, got nan"),
        ({"loss_type": "ift", "ift_lambda": math.nan}, r"`ift_lambda` must be in \[0, 1\], got nan"),
        ({"loss_type": "ift", "ift_lambda_warmup_steps": 100},
         r"`ift_lambda_warmup_steps=100` has no effect with `ift_lambda_schedule='constant'`: set "
         r"`ift_lambda_schedule='linear'`"),
        ({"loss_type": "ift", "ift_lambda_schedule": "linear"},
         r"`ift_lambda_schedule='linear'` ramps over `ift_lambda_warmup_steps` steps, got 0: set it > 0"),
        ({"loss_type": "nll", "precompute_ref_log_probs": True},
         r"`precompute_ref_log_probs=True` is for `loss_type='kl_sft'`; `nll` has no reference model"),
        ({"loss_type": "ift", "neftune_noise_alpha": 5.0},
         r"`neftune_noise_alpha` is not supported with `loss_type='ift'`: its noise would enter the passes `ift` runs"),
        ({"loss_type": "kl_sft", "neftune_noise_alpha": 5.0},
         r"`neftune_noise_alpha` is not supported with `loss_type='kl_sft'`.*toward the reference would measure noise"),
        ({"loss_type": "kl_sft", "label_smoothing_factor": 0.1},
         r"`label_smoothing_factor=0.1` is not supported with `loss_type='kl_sft'`.*Set it to 0"),
        ({"loss_type": "kl_sft", "precompute_ref_log_probs": True, "packing": True},
         r"`precompute_ref_log_probs=True` does not support `packing` or `padding_free`"),
    ],
    ids=["nan_kl_coef", "nan_ift_lambda", "warmup_with_constant_schedule", "linear_schedule_without_warmup",
         "precompute_with_nll", "neftune_with_ift", "neftune_with_kl_sft", "label_smoothing", "precompute_packing"],
)
def test_sft_config_refusals(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        make_config(SFTConfig, tmp_path, **config)


def test_values_set_after_the_config_are_checked_by_the_trainer(tiny_model_dir, preference_dataset, tmp_path):
    args = make_config(SFTConfig, tmp_path, loss_type="kl_sft")
    args.kl_coef = math.nan
    with pytest.raises(ValueError, match="`kl_coef` must be a finite number"):
        SFTTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset)
    args = make_config(DPOConfig, tmp_path, loss_type="dpop")
    args.loss_type = []
    with pytest.raises(ValueError, match="`loss_type` is empty"):
        DPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset)


@pytest.mark.parametrize("loss_type", ["kl_sft", "ift"])
def test_compute_loss_func_is_refused(tiny_model_dir, preference_dataset, tmp_path, loss_type):
    """TRL would run the forward trl_ext reads without gradient: the penalty would be added with zero gradient."""
    def custom_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.float().mean()

    with pytest.raises(ValueError, match=rf"`compute_loss_func` cannot be combined with `loss_type='{loss_type}'`"):
        SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path, loss_type=loss_type),
                   train_dataset=preference_dataset, compute_loss_func=custom_loss)


def test_sft_dataset_with_chosen_but_no_rejected_names_the_fix(tiny_model_dir, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["The sun was setting over"] * 4, "chosen": [" the campus."] * 4})
    with pytest.raises(ValueError, match=r"The train dataset has `chosen` but no `rejected` column.*rename `chosen` "
                                         r"to `completion`"):
        SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path), train_dataset=dataset)


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is supported on this machine")
def test_bf16_left_unset_is_off_on_a_cpu_and_an_explicit_bf16_still_fails(tmp_path):
    for config_cls in (DPOConfig, SFTConfig):
        assert config_cls(output_dir=str(tmp_path)).bf16 is False
        with pytest.raises(ValueError, match="doesn't support bf16"):
            config_cls(output_dir=str(tmp_path), bf16=True)
