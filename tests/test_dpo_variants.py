"""cDPO, R-DPO, beta-DPO, NPO, TDPO and sDPO in `trl_ext.DPOTrainer` on the tiny random Llama; per-token losses;
model cards."""

import math
import os

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from trl_ext import DPOConfig, DPOTrainer, PreferenceLossOutput, register_dpo_loss
from trl_ext.citations import DPO as DPO_PAPER
from trl_ext.losses.tdpo import token_kl
from trl_ext.trainers import stepwise_dpo
from trl_ext.trainers.dpo import LOSS_STATE_FILE
from trl_ext.trl_contract import TRL_DPO_CHOSEN_METRICS

from .conftest import LORA, make_config, step_logs, train


def test_degenerate_settings_train_as_trl_sigmoid(tiny_model_dir, preference_dataset, tmp_path):
    """cDPO without smoothing, R-DPO without length weight, and one sDPO stage are TRL's sigmoid, every metric."""
    theirs = step_logs(train(trl.DPOTrainer, trl.DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "trl",
                             loss_type="sigmoid", max_steps=2))
    for fields in ({"loss_type": "cdpo", "label_smoothing": 0.0, "sdpo_stages": 1},
                   {"loss_type": "rdpo", "rdpo_alpha": 0.0}):
        ours = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / fields["loss_type"],
                     max_steps=2, **fields)
        assert step_logs(ours, drop={"rdpo/length_difference"}) == theirs


def test_cdpo_and_rdpo_first_step_by_hand(tiny_model_dir, preference_dataset, tmp_path):
    """At step 0 policy = reference, so every margin is 0: cDPO's loss is log 2 whatever the smoothing, and R-DPO's
    is softplus(-alpha * (|y_w| - |y_l|)) with the tokenized lengths."""
    cdpo = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "cdpo", loss_type="cdpo",
                 label_smoothing=0.2, max_steps=1)
    assert step_logs(cdpo)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    rdpo = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "rdpo", loss_type="rdpo",
                 rdpo_alpha=0.1, max_steps=1)
    log = step_logs(rdpo)[0]
    difference = log["rdpo/length_difference"]
    assert difference != 0  # the test sentences differ in length
    assert log["loss"] == pytest.approx(math.log1p(math.exp(-0.1 * difference)), abs=1e-5)


def test_npo_lowers_the_rejected_likelihood(tiny_model_dir, preference_dataset, tmp_path):
    trainer = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path, loss_type="npo",
                    learning_rate=5e-3, max_steps=2)
    logs = step_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)  # rho = 0: (2 / beta) log 2
    assert logs[-1]["rewards/rejected"] < -0.1
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_npo_trains_without_chosen_and_ignores_it(tiny_model_dir, preference_dataset, tmp_path):
    """Without `chosen` (an empty placeholder then), NPO's losses are those on the same rejected completions with any
    chosen ones, and no metric of the chosen completions is logged."""
    with_chosen = step_logs(train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "chosen",
                                  loss_type="npo", learning_rate=5e-3, max_steps=3))
    without = preference_dataset.remove_columns("chosen")
    logs = step_logs(train(DPOTrainer, DPOConfig, tiny_model_dir, without, tmp_path / "rejected_only",
                           loss_type="npo", learning_rate=5e-3, max_steps=3))
    assert [log["loss"] for log in logs] == pytest.approx([log["loss"] for log in with_chosen], abs=1e-5)
    assert [log["rewards/rejected"] for log in logs] == pytest.approx(
        [log["rewards/rejected"] for log in with_chosen], abs=1e-6)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert not set(TRL_DPO_CHOSEN_METRICS) & {key for log in logs for key in log}
    assert set(TRL_DPO_CHOSEN_METRICS) <= set(with_chosen[0])

    conversational = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": text}] for text in without["prompt"]],
        "rejected": [[{"role": "assistant", "content": text}] for text in without["rejected"]],
    })
    trainer = DPOTrainer(model=tiny_model_dir, train_dataset=conversational,
                         args=make_config(DPOConfig, tmp_path / "conversational", loss_type="npo", max_steps=1),
                         processing_class=_with_chat_template(tiny_model_dir))
    trainer.train()
    assert step_logs(trainer)[0]["loss"] == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)


def test_evaluation_drops_the_chosen_metrics_of_a_dataset_without_chosen_only(tiny_model_dir, preference_dataset,
                                                                               tmp_path):
    """A dataset passed to `evaluate` gets its placeholder there, and only its evaluation drops the chosen metrics."""
    trainer = DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="npo"),
                         train_dataset=preference_dataset)
    without = trainer.evaluate(preference_dataset.remove_columns("chosen"))
    assert not {f"eval_{name}" for name in TRL_DPO_CHOSEN_METRICS} & set(without)
    full = trainer.evaluate(preference_dataset)
    assert {"eval_rewards/chosen", "eval_logps/chosen", "eval_rewards/margins"} <= set(full)
    assert without["eval_rewards/rejected"] == pytest.approx(full["eval_rewards/rejected"])


def test_dataset_without_chosen_is_refused_for_losses_that_read_it(tiny_model_dir, preference_dataset, tmp_path):
    without = preference_dataset.remove_columns("chosen")
    for config_cls, loss_type in ((DPOConfig, ["npo", "sigmoid"]), (DPOConfig, "rdpo"), (trl.DPOConfig, "sigmoid")):
        with pytest.raises(ValueError, match=r"train dataset has no `chosen` column, which `loss_type` "
                                             r"\[.*\] reads. Add `chosen` completions, or train only .*'npo'"):
            DPOTrainer(model=tiny_model_dir, train_dataset=without,
                       args=make_config(config_cls, tmp_path, loss_type=loss_type))


def _with_chat_template(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    return tokenizer


BETA_DPO = dict(loss_type="beta_dpo", beta_dpo_alpha=1.0, beta_dpo_filter_ratio=0.25)


def test_beta_dpo_logs_its_beta_and_its_state_survives_resume(tiny_model_dir, preference_dataset, tmp_path):
    full = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "full", max_steps=3,
                 save_strategy="steps", save_steps=2, **BETA_DPO)
    logs = step_logs(full)
    assert logs[0]["beta_dpo/beta"] == pytest.approx(0.1)  # margins 0, running mean 0
    assert logs[0]["beta_dpo/kept"] == pytest.approx(0.75)  # 3 of 4 pairs
    assert logs[-1]["beta_dpo/running_mean"] != 0
    assert logs[-1]["beta_dpo/beta"] != pytest.approx(0.1)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / LOSS_STATE_FILE).is_file()
    resumed = DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                         args=make_config(DPOConfig, tmp_path / "resumed", max_steps=3, **BETA_DPO))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    keys = ("beta_dpo/beta", "beta_dpo/running_mean", "beta_dpo/running_std", "loss")
    # The resumed history starts with the checkpoint's two steps
    assert [[log[key] for key in keys] for log in step_logs(resumed)[2:]] == [[logs[2][key] for key in keys]]

    os.remove(checkpoint / LOSS_STATE_FILE)
    with pytest.raises(FileNotFoundError, match=LOSS_STATE_FILE):
        DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                   args=make_config(DPOConfig, tmp_path / "again", max_steps=3, **BETA_DPO)
                   ).train(resume_from_checkpoint=str(checkpoint))


def test_registered_loss_receives_per_token_log_probs(tiny_model_dir, preference_dataset, tmp_path):
    seen = {}

    @register_dpo_loss("test_token_level", token_logps=True)
    def token_level(batch, config):
        seen["sums"] = (batch.chosen_token_logps * batch.chosen_mask).sum(1), batch.chosen_logps
        seen["ref"] = (batch.ref_rejected_token_logps * batch.rejected_mask).sum(1), batch.ref_rejected_logps
        seen["lengths"] = batch.chosen_mask.sum(1).float(), batch.chosen_lengths
        per_token_margin = batch.chosen_token_logps - batch.ref_chosen_token_logps
        return PreferenceLossOutput(per_token_margin.sum(1) * 0, {"tokens": batch.chosen_mask.sum(1).float()})

    train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path,
          loss_type=["sigmoid", "test_token_level"], max_steps=1)
    for computed, given in seen.values():
        torch.testing.assert_close(computed, given)
    with pytest.raises(ValueError, match=r"`test_token_level` reads the reference's per-token log-probs"):
        make_config(DPOConfig, tmp_path, loss_type="test_token_level", precompute_ref_log_probs=True)


@pytest.mark.parametrize(
    "loss_type, cited, not_cited",
    [(["dpop"], ["2402.13228"], ["2305.18290"]), (["sigmoid", "npo"], ["2305.18290", "2404.05868"], ["2402.13228"])],
    ids=["dpop", "sigmoid+npo"],
)
def test_model_card_cites_the_losses_used(tiny_model_dir, preference_dataset, tmp_path, loss_type, cited, not_cited):
    trainer = DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                         args=make_config(DPOConfig, tmp_path, loss_type=loss_type))
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    for arxiv_id in cited:
        assert f"eprint        = {{{arxiv_id}}}" in card
    for arxiv_id in not_cited:
        assert arxiv_id not in card
    assert f"https://huggingface.co/papers/{cited[0]}" in card  # "a method introduced in" the first one
    tags = card.split("---")[1]
    for name in ["trl-ext", *loss_type]:
        assert f"- {name}\n" in tags


def test_vocabulary_kl_equals_the_kl_of_full_logits(tiny_model_dir, preference_dataset, tmp_path):
    """The chunked KL from recorded hidden states against the KL of both models' full logits."""
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in ref_model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    seen = {}

    @register_dpo_loss("test_vocabulary_kl", vocabulary_kl=True)
    def record_kl(batch, config):
        seen["kl"] = torch.cat([batch.chosen_token_kl, batch.rejected_token_kl])
        return batch.margins * 0

    trainer = DPOTrainer(model=tiny_model_dir, ref_model=ref_model, train_dataset=preference_dataset,
                         args=make_config(DPOConfig, tmp_path, loss_type="test_vocabulary_kl"))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, inputs)
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        policy_logits = trainer.model(**model_inputs).logits[:, :-1]
        ref_logits = trainer.ref_model(**model_inputs).logits[:, :-1]
    expected = token_kl(policy_logits.flatten(0, 1), ref_logits.flatten(0, 1)).view(policy_logits.shape[:2])
    expected = expected * inputs["completion_mask"][:, 1:]
    assert expected.sum() > 0
    torch.testing.assert_close(seen["kl"].detach(), expected, atol=1e-5, rtol=1e-4)
    assert seen["kl"].requires_grad


def test_tdpo_trains_from_zero_kl(tiny_model_dir, preference_dataset, tmp_path):
    for loss_type in ("tdpo1", "tdpo2"):
        logs = step_logs(train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / loss_type,
                               loss_type=loss_type, learning_rate=5e-3, max_steps=2))
        # policy = reference at step 0: no KL, DPO's log 2
        assert logs[0][f"{loss_type}/kl_chosen"] == pytest.approx(0.0, abs=1e-6)
        assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert logs[-1][f"{loss_type}/kl_rejected"] > 0
        assert logs[-1]["rewards/margins"] > 0


def test_tdpo_evaluates_with_compute_metrics(tiny_model_dir, preference_dataset, tmp_path):
    """`compute_metrics` makes TRL run one more forward per evaluation batch, for its logits: the KL is still read
    from the loss's policy and reference forwards, so the evaluation logs the same numbers."""
    results = []
    for compute_metrics in (None, lambda predictions: {"rows": float(len(predictions.label_ids))}):
        trainer = DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="tdpo2"),
                             train_dataset=preference_dataset, eval_dataset=preference_dataset,
                             compute_metrics=compute_metrics)
        results.append(trainer.evaluate())
    plain, with_metrics = results
    assert with_metrics["eval_rows"] == 2 * len(preference_dataset)  # a chosen and a rejected row per pair
    for key in ("eval_loss", "eval_tdpo2/kl_rejected", "eval_rewards/margins"):
        assert with_metrics[key] == pytest.approx(plain[key], abs=1e-6)


def test_sdpo_refuses_more_stages_than_steps(tiny_model_dir, preference_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"`sdpo_stages=4` \(stepwise DPO\) needs at least one optimizer step per "
                                         r"stage, and `max_steps` is 3"):
        make_config(DPOConfig, tmp_path, sdpo_stages=4, max_steps=3)
    # 12 pairs, 4 per step: 3 steps in the epoch, known when training starts
    trainer = DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset.select(range(12)),
                         args=make_config(DPOConfig, tmp_path, sdpo_stages=4, max_steps=-1, num_train_epochs=1))
    with pytest.raises(ValueError, match=r"`sdpo_stages=4` \(stepwise DPO\) needs at least one optimizer step per "
                                         r"stage, and this run has 3: set `sdpo_stages` to at most 3"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert stepwise_dpo.stage_boundaries(3, 3) == [1, 2] and stepwise_dpo.stage_boundaries(5, 4) == [1, 2, 4]


@pytest.mark.parametrize("peft", [False, True], ids=["full_fine_tuning", "peft"])
def test_sdpo_policy_becomes_the_reference_at_each_stage(tiny_model_dir, preference_dataset, tmp_path, peft):
    trainer = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path,
                    {"peft_config": LORA} if peft else None, loss_type="sigmoid", sdpo_stages=2, max_steps=4,
                    learning_rate=5e-3)
    margins = [log["rewards/margins"] for log in step_logs(trainer)]
    # Steps 1 and 3 start a stage: the policy is the reference, every log-ratio is 0
    assert margins[0] == 0.0 and margins[2] == pytest.approx(0.0, abs=1e-6)
    assert margins[1] > 0 and margins[3] > 0


@pytest.mark.parametrize("peft", [False, True], ids=["full_fine_tuning", "peft"])
def test_sdpo_with_precomputed_reference_trains_as_on_the_fly(tiny_model_dir, preference_dataset, tmp_path, peft):
    """The reference log-probs recomputed at the boundary are the stage-1-end policy's, computed here from its full
    logits; training and evaluation then match sDPO with the reference run on the fly."""
    trainer_kwargs = {"eval_dataset": preference_dataset, **({"peft_config": LORA} if peft else {})}
    fields = dict(loss_type="sigmoid", sdpo_stages=2, max_steps=4, learning_rate=5e-3, eval_strategy="steps",
                  eval_steps=4)
    boundary = {}

    class RecordBoundaryPolicy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:  # after the stage boundary's recompute
                trainer = self.trainer
                rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
                batch = trainer._prepare_inputs(trainer.data_collator(rows))
                with torch.no_grad():
                    boundary["expected"] = _sequence_logps(trainer.model, batch)
                boundary["recomputed"] = [trainer.stepwise_reference.reference_logps[key]
                                         for key in stepwise_dpo.pair_keys(batch)]

    precomputed = DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                             args=make_config(DPOConfig, tmp_path / "precomputed", precompute_ref_log_probs=True,
                                              **fields), **trainer_kwargs)
    recorder = RecordBoundaryPolicy()
    recorder.trainer = precomputed
    precomputed.add_callback(recorder)
    precomputed.train()
    expected = torch.stack(boundary["expected"], dim=1).cpu()
    torch.testing.assert_close(torch.tensor(boundary["recomputed"]), expected, atol=1e-4, rtol=1e-5)
    on_the_fly = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "on_the_fly",
                       trainer_kwargs, **fields)
    for ours, theirs in zip(precomputed.state.log_history, on_the_fly.state.log_history, strict=True):
        for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins"):
            assert ours.get(key) == pytest.approx(theirs.get(key), abs=1e-5)
    margins = [log["rewards/margins"] for log in step_logs(precomputed)]
    assert margins[2] == pytest.approx(0.0, abs=1e-5) and margins[3] > 0  # stage 2 starts from its own reference


def _sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of `[chosen; rejected]` rows, from the model's full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    token_logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1).chunk(2)


def test_sdpo_refuses_what_it_cannot_honour(tiny_model_dir, preference_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"`sdpo_stages` must be an integer >= 1, got 0"):
        make_config(DPOConfig, tmp_path, sdpo_stages=0)
    with pytest.raises(ValueError, match=r"`sdpo_stages=2` \(stepwise DPO\) makes the policy the reference .* Set "
                                         r"`sync_ref_model=False`"):
        make_config(DPOConfig, tmp_path, sdpo_stages=2, sync_ref_model=True)
    trainer = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path / "first", sdpo_stages=3,
                    max_steps=3, save_strategy="steps", save_steps=2)
    resumed = DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                         args=make_config(DPOConfig, tmp_path / "resumed", sdpo_stages=3, max_steps=3))
    with pytest.raises(ValueError, match=r"Resuming stepwise DPO \(`sdpo_stages`\) from step 2, past the stage "
                                         r"boundary at step 1"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
    assert trainer.state.global_step == 3


def test_trl_config_is_accepted_for_trl_losses(tiny_model_dir, preference_dataset, tmp_path):
    trainer = DPOTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                         args=make_config(trl.DPOConfig, tmp_path, loss_type="sigmoid"))
    assert trainer.extension_losses == [] and trainer.loss_papers() == [DPO_PAPER]


def test_beta_dpo_evaluation_keeps_every_pair_and_repeats(tiny_model_dir, preference_dataset, tmp_path):
    trainer = train(DPOTrainer, DPOConfig, tiny_model_dir, preference_dataset, tmp_path, loss_type="beta_dpo",
                    beta_dpo_filter_ratio=0.5, max_steps=1)
    first, second = (trainer.evaluate(preference_dataset) for _ in range(2))
    assert first["eval_beta_dpo/kept"] == 1.0
    assert first["eval_loss"] == second["eval_loss"]
