"""`trl_ext.DPOTrainer` against `trl.DPOTrainer` on a tiny random Llama (seconds on CPU)."""

import math

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import trl_ext
from trl_ext import DPOConfig, DPOTrainer, PreferenceLossOutput, register_dpo_loss

from .conftest import CHOSEN, LORA, OPENERS, make_config, step_logs, train


@pytest.mark.parametrize(
    "loss_config",
    [
        {"loss_type": ["sigmoid"]},
        {"loss_type": ["ipo"]},
        {"loss_type": ["hinge"]},
        {"loss_type": ["sigmoid_norm"]},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]},
    ],
    ids=lambda config: "+".join(config["loss_type"]),
)
def test_trl_loss_types_match_trl(tiny_model_dir, preference_dataset, tmp_path, loss_config):
    ours = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "ours", **loss_config)
    theirs = train(trl.DPOTrainer, trl.DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "trl", **loss_config)
    assert len(step_logs(ours)) == 3
    assert step_logs(ours) == step_logs(theirs)  # every loss and metric, exactly
    assert {"rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(step_logs(ours)[0])


def test_dpop_lambda_zero_matches_trl_sigmoid(tiny_model_dir, preference_dataset, tmp_path):
    ours = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "ours",
                 loss_type="dpop", dpop_lambda=0.0)
    theirs = train(trl.DPOTrainer, trl.DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "trl",
                   loss_type="sigmoid")
    for our_entry, their_entry in zip(step_logs(ours), step_logs(theirs), strict=True):
        assert our_entry.pop("dpop/penalty") == 0.0
        our_entry.pop("dpop/active")
        assert our_entry == their_entry


def near_duplicate_pairs(n: int = 16) -> Dataset:
    """Pairs whose rejected completion repeats the chosen one's last word: a one-token edit, the case where DPO is
    known to lower the chosen likelihood along with the rejected one."""
    adjectives, places = ["busy", "quiet", "old", "new"], ["campus", "library", "river", "museum"]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        adjective, place = adjectives[i % 4], places[(i // 4) % 4]
        rows["prompt"].append(OPENERS[i % len(OPENERS)])
        rows["chosen"].append(f" the {adjective} {place}.")
        rows["rejected"].append(f" the {adjective} {place} {place}.")
    return Dataset.from_dict(rows)


def test_dpop_keeps_chosen_reward_above_dpo(tiny_model_dir, tmp_path):
    """Same seed and data: DPO lets the chosen log-ratio fall, DPOP's penalty holds it up."""
    dataset = near_duplicate_pairs()
    common = dict(max_steps=16, learning_rate=1e-2, beta=0.1)
    dpo = train(DPOTrainer, DPOConfig, tiny_model_dir, dataset, tmp_path / "dpo", loss_type="sigmoid", **common)
    dpop = train(DPOTrainer, DPOConfig, tiny_model_dir, dataset, tmp_path / "dpop",
                 loss_type="dpop", dpop_lambda=50.0, **common)
    dpop_logs, dpo_logs = step_logs(dpop), step_logs(dpo)
    assert dpop_logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert dpop_logs[-1]["loss"] < dpop_logs[0]["loss"]
    assert dpo_logs[-1]["rewards/chosen"] < -0.5  # the failure DPOP targets
    assert dpop_logs[-1]["rewards/chosen"] > 0
    assert max(entry["dpop/active"] for entry in dpop_logs) > 0  # the penalty did switch on


@pytest.mark.parametrize(
    "setup",
    ["peft_adapter_reference", "explicit_ref_model", "precomputed_reference", "peft_precomputed"],
)
def test_dpop_reference_setups(tiny_model_dir, preference_dataset, tmp_path, setup):
    trainer_kwargs, config = {}, {}
    if setup.startswith("peft"):
        trainer_kwargs["peft_config"] = LORA
    if setup == "explicit_ref_model":
        trainer_kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if setup.endswith("precomputed") or setup == "precomputed_reference":
        config["precompute_ref_log_probs"] = True
    trainer = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path, trainer_kwargs,
                    loss_type="dpop", learning_rate=5e-3, max_steps=4, **config)
    logs = step_logs(trainer)
    # The reference equals the initial policy in every setup, so the first step sees zero rewards and loss log 2.
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logs[0]["dpop/penalty"] == pytest.approx(0.0, abs=1e-4)
    assert logs[-1]["rewards/margins"] > 0
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_dpop_gradient_accumulation_matches_full_batch(tiny_model_dir, preference_dataset, tmp_path):
    full = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "full",
                 loss_type="dpop", per_device_train_batch_size=8, max_steps=2)
    accumulated = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "accumulated",
                        loss_type="dpop", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2)
    for full_entry, accumulated_entry in zip(step_logs(full), step_logs(accumulated), strict=True):
        for key in ("loss", "rewards/chosen", "dpop/penalty", "logps/chosen"):
            assert accumulated_entry[key] == pytest.approx(full_entry[key], rel=1e-4, abs=1e-6), key


def test_dpop_evaluation_logs_metrics(tiny_model_dir, preference_dataset, tmp_path):
    trainer = DPOTrainer(
        model=tiny_model_dir,
        args=make_config(DPOConfig, tmp_path, loss_type=["dpop", "sft"], loss_weights=[1.0, 0.1]),
        train_dataset=preference_dataset,
        eval_dataset=preference_dataset.select(range(8)),
    )
    before = trainer.evaluate()
    assert before["eval_dpop/penalty"] == 0.0
    assert before["eval_rewards/chosen"] == 0.0
    # Every chosen completion is CHOSEN plus EOS; "sft" (weight 0.1) is the mean per-token NLL of the chosen tokens
    chosen_tokens = len(trainer.processing_class(CHOSEN)["input_ids"]) + 1
    sft_nll = -before["eval_logps/chosen"] / chosen_tokens
    assert before["eval_loss"] == pytest.approx(math.log(2) + 0.1 * sft_nll, rel=1e-5)
    trainer.train()
    after = trainer.evaluate()
    assert {"eval_dpop/penalty", "eval_dpop/active", "eval_rewards/margins"} <= set(after)
    assert after["eval_rewards/margins"] > 0


def test_dpop_with_4bit_lora(tiny_model_dir, preference_dataset, tmp_path):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    trainer = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path,
                    {"peft_config": LORA, "quantization_config": quantization},
                    loss_type="dpop", learning_rate=5e-3, max_steps=3)
    assert trainer.model.base_model.model.model.layers[0].mlp.up_proj.weight.__class__.__name__ == "Params4bit"
    logs = step_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[-1]["rewards/margins"] > 0


def test_custom_registered_loss(tiny_model_dir, preference_dataset, tmp_path):
    @register_dpo_loss("test_shifted_sigmoid")
    def shifted_sigmoid(batch, config):
        margin = batch.chosen_logratios - batch.rejected_logratios
        losses = -torch.nn.functional.logsigmoid(config.beta * margin - 1.0)
        return PreferenceLossOutput(losses, {"margin": margin.detach()})

    assert "test_shifted_sigmoid" in trl_ext.registered_dpo_losses()
    trainer = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path,
                    loss_type=["sigmoid", "test_shifted_sigmoid"], loss_weights=[1.0, 2.0], max_steps=1)
    log = step_logs(trainer)[0]
    # At step 0 the margin is 0: loss = log 2 + 2 * softplus(1)
    assert log["loss"] == pytest.approx(math.log(2) + 2 * math.log1p(math.e), abs=1e-5)
    assert log["test_shifted_sigmoid/margin"] == pytest.approx(0.0, abs=1e-5)


def test_registering_a_name_again_replaces_it_with_a_warning():
    @register_dpo_loss("test_cell_rerun")
    def first(batch, config):
        return batch.chosen_logratios * 0

    with pytest.warns(UserWarning, match="Replacing the DPO loss `test_cell_rerun`"):
        @register_dpo_loss("test_cell_rerun")
        def second(batch, config):
            return batch.chosen_logratios * 0 + 1

    assert trl_ext.losses.registered_dpo_loss("test_cell_rerun").fn is second


def test_registering_trl_name_is_refused():
    with pytest.raises(ValueError, match="TRL's own"):
        register_dpo_loss("sigmoid")


def test_unknown_loss_type_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as error:
        make_config(DPOConfig, tmp_path, loss_type=["sigmoid", "dpopp"])
    message = str(error.value)
    assert "['dpopp']" in message
    for name in ("sigmoid", "ipo", "sigmoid_norm", "dpop", "dpop_norm"):
        assert f"'{name}'" in message


def test_negative_dpop_lambda_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`dpop_lambda` must be a finite number >= 0, got -1.0"):
        make_config(DPOConfig, tmp_path, loss_type="dpop", dpop_lambda=-1.0)


def test_trl_option_that_dpop_cannot_honour_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`ld_alpha=0.5` is not supported"):
        make_config(DPOConfig, tmp_path, loss_type="dpop", ld_alpha=0.5)


def test_loss_changed_after_config_is_checked_by_trainer(tiny_model_dir, preference_dataset, tmp_path):
    args = make_config(DPOConfig, tmp_path, loss_type="dpop")
    args.dpop_lambda = -3.0
    with pytest.raises(ValueError, match="dpop_lambda"):
        DPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset)


def test_dataset_without_preference_columns_is_refused(tiny_model_dir, tmp_path):
    dataset = Dataset.from_dict({"question": ["Q?"] * 4, "response_j": ["good"] * 4, "response_k": ["bad"] * 4})
    with pytest.raises(ValueError, match=r"train dataset needs `chosen` and `rejected` columns"):
        DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="dpop"),
                   train_dataset=dataset)
