"""`register_sft_loss`: user losses in `trl_ext.SFTTrainer`, the declared reference, and model cards."""

import pytest
import torch

import trl_ext
from trl_ext import SFTConfig, SFTLossOutput, SFTTrainer, register_sft_loss
from trl_ext.losses import sequence_mean

from .conftest import LORA, make_config, step_logs, train


def test_kl_sft_and_ift_are_registered_and_exported():
    assert {"kl_sft", "ift"} <= set(trl_ext.registered_sft_losses())
    assert trl_ext.losses.registered_sft_loss("kl_sft").reference
    ift = trl_ext.losses.registered_sft_loss("ift")
    assert ift.ift_inputs and ift.replaces_nll


def test_registered_loss_is_added_to_trl_nll(tiny_model_dir, preference_dataset, tmp_path):
    seen = {}

    @register_sft_loss("test_drift", reference=True)
    def drift(batch, config):
        seen["ref"] = batch.ref_token_logps
        logratio = sequence_mean(batch.policy_token_logps - batch.ref_token_logps, batch.mask)
        return SFTLossOutput(logratio + 0.5, {"drift/logratio": logratio, "drift/nll": batch.nll})

    ours = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "ours",
                 {"peft_config": LORA}, loss_type="test_drift", max_steps=1)
    nll = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "nll",
                {"peft_config": LORA}, loss_type="nll", max_steps=1)
    log, nll_log = step_logs(ours)[0], step_logs(nll)[0]
    # At step 0 the reference (adapter disabled) is the policy: the added loss is 0 + 0.5
    assert log["drift/logratio"] == pytest.approx(0.0, abs=1e-6)
    assert log["loss"] == pytest.approx(nll_log["loss"] + 0.5, abs=1e-5)
    assert log["drift/nll"] == pytest.approx(nll_log["loss"], rel=1e-5)
    assert seen["ref"] is not None and seen["ref"].requires_grad is False


def test_registered_loss_without_reference_gets_none_and_refuses_precompute(tiny_model_dir, preference_dataset,
                                                                            tmp_path):
    @register_sft_loss("test_length")
    def length(batch, config):
        assert batch.ref_token_logps is None
        return SFTLossOutput(batch.mask.sum(1).float() * 0, {"length/tokens": batch.mask.sum(1).float()})

    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path, loss_type="test_length",
                    max_steps=1)
    assert trainer.ref_model is None
    assert step_logs(trainer)[0]["length/tokens"] > 0
    with pytest.raises(ValueError, match=r"`test_length` has no reference model"):
        make_config(SFTConfig, tmp_path, loss_type="test_length", precompute_ref_log_probs=True)


def test_registered_loss_may_return_plain_per_sequence_values(tiny_model_dir, preference_dataset, tmp_path):
    @register_sft_loss("test_constant")
    def constant(batch, config):
        return torch.full(batch.mask.shape[:1], 0.25)

    ours = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "ours",
                 loss_type="test_constant", max_steps=1)
    nll = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "nll", loss_type="nll",
                max_steps=1)
    assert step_logs(ours)[0]["loss"] == pytest.approx(step_logs(nll)[0]["loss"] + 0.25, abs=1e-5)


def test_trl_sft_loss_name_cannot_be_registered():
    with pytest.raises(ValueError, match="TRL's own SFT loss types"):
        register_sft_loss("nll")


@pytest.mark.parametrize("loss_type, cited", [("ift", "2405.11870"), ("kl_sft", None)])
def test_sft_model_card_cites_the_loss_used(tiny_model_dir, preference_dataset, tmp_path, loss_type, cited):
    trainer = SFTTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                         args=make_config(SFTConfig, tmp_path, loss_type=loss_type))
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert f"- {loss_type}\n" in card.split("---")[1]
    if cited:
        assert f"eprint        = {{{cited}}}" in card
    else:
        assert "bibtex\n@" not in card.split("Cite TRL as")[0]  # no paper for KL-SFT; TRL's own citation remains
