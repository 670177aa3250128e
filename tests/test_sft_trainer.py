"""`trl_ext.SFTTrainer` against `trl.SFTTrainer` on a tiny random Llama (seconds on CPU)."""

import dataclasses
import gc
import weakref
from pathlib import Path

import pytest
import torch
import trl
from datasets import load_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_ext import SFTConfig, SFTTrainer
from trl_ext.trainers.reference import reference_token_logps

from .conftest import LORA, make_config, step_logs, train

ROOT = Path(__file__).resolve().parents[1]
KL_KEYS = {"kl/penalty", "kl/nll", "logps/policy", "logps/ref"}


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_trl_loss_types_match_trl(tiny_model_dir, preference_dataset, tmp_path, loss_type):
    dataset = preference_dataset.rename_column("chosen", "completion").remove_columns("rejected")
    ours = train(SFTTrainer, SFTConfig, tiny_model_dir, dataset, tmp_path / "ours", loss_type=loss_type)
    theirs = train(trl.SFTTrainer, trl.SFTConfig, tiny_model_dir, dataset, tmp_path / "trl", loss_type=loss_type)
    assert len(step_logs(ours)) == 3
    assert step_logs(ours) == step_logs(theirs)


def test_preference_dataset_trains_on_chosen(tiny_model_dir, preference_dataset, tmp_path):
    ours = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "ours")
    prompt_completion = preference_dataset.rename_column("chosen", "completion").remove_columns("rejected")
    theirs = train(trl.SFTTrainer, trl.SFTConfig, tiny_model_dir, prompt_completion, tmp_path / "trl")
    assert step_logs(ours) == step_logs(theirs)
    assert "rejected" not in ours.train_dataset.column_names


@pytest.mark.parametrize("kl_penalty", ["sq_logratio", "token_kl"])
def test_kl_coef_zero_is_nll(tiny_model_dir, preference_dataset, tmp_path, kl_penalty):
    ours = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "ours",
                 loss_type="kl_sft", kl_coef=0.0, kl_penalty=kl_penalty)
    theirs = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "nll", loss_type="nll")
    assert step_logs(ours, drop=KL_KEYS) == step_logs(theirs)


@pytest.mark.parametrize("kl_penalty", ["sq_logratio", "token_kl"])
@pytest.mark.parametrize("reference", ["frozen_copy", "peft_adapter_disabled", "explicit_ref_model"])
def test_kl_sft_trains_with_each_reference(tiny_model_dir, preference_dataset, tmp_path, kl_penalty, reference):
    trainer_kwargs = {}
    if reference == "peft_adapter_disabled":
        trainer_kwargs["peft_config"] = LORA
    if reference == "explicit_ref_model":
        trainer_kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path, trainer_kwargs,
                    loss_type="kl_sft", kl_penalty=kl_penalty, kl_coef=1.0, learning_rate=1e-2, max_steps=6)
    assert (trainer.ref_model is None) == (reference == "peft_adapter_disabled")
    logs = step_logs(trainer)
    # The reference is the initial policy: no penalty at the first step, and the loss is the NLL alone
    assert logs[0]["kl/penalty"] == pytest.approx(0.0, abs=1e-8)
    assert logs[0]["logps/policy"] == pytest.approx(logs[0]["logps/ref"], abs=1e-5)
    assert logs[0]["loss"] == pytest.approx(logs[0]["kl/nll"], rel=1e-5)
    assert logs[-1]["kl/penalty"] > 0
    assert logs[-1]["kl/nll"] < logs[0]["kl/nll"]
    assert logs[-1]["logps/ref"] == pytest.approx(logs[0]["logps/ref"], rel=0.02)  # the reference stays frozen


def test_kl_sft_penalty_holds_policy_closer_to_reference(tiny_model_dir, preference_dataset, tmp_path):
    common = dict(loss_type="kl_sft", learning_rate=1e-2, max_steps=6)
    free = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "free", kl_coef=0.0, **common)
    held = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "held", kl_coef=5.0, **common)
    assert step_logs(held)[-1]["kl/penalty"] < 0.5 * step_logs(free)[-1]["kl/penalty"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"loss_type": "kl_sft", "kl_coef": -0.1}, r"`kl_coef` must be a finite number >= 0, got -0.1"),
        ({"loss_type": "kl_sft", "kl_penalty": "forward_kl"},
         r"Unknown `kl_penalty` 'forward_kl'. Valid values: \['sq_logratio', 'token_kl'\]"),
        ({"loss_type": "klsft"},
         r"Unknown `loss_type` 'klsft'. Valid values: TRL's \['nll', 'dft'\] and trl_ext's \['kl_sft', 'ift'"),
    ],
)
def test_bad_config_is_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        make_config(SFTConfig, tmp_path, **config)


def test_ift_gamma_and_lambda_zero_is_nll(tiny_model_dir, preference_dataset, tmp_path):
    # Every completion has the same length here, so the per-sequence mean equals TRL's per-token mean.
    ift = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "ift",
                loss_type="ift", ift_gamma=0.0, ift_lambda=0.0)
    nll = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "nll", loss_type="nll")
    for ift_entry, nll_entry in zip(step_logs(ift), step_logs(nll), strict=True):
        assert ift_entry["loss"] == pytest.approx(nll_entry["loss"], rel=1e-5)
        assert ift_entry["ift/nll_mixed"] == pytest.approx(nll_entry["loss"], rel=1e-5)
        assert ift_entry["ift/nll_teacher_forced"] == pytest.approx(nll_entry["loss"], rel=1e-5)


@pytest.mark.parametrize("prediction", ["greedy", "soft"])
def test_ift_trains(tiny_model_dir, preference_dataset, tmp_path, prediction):
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path,
                    loss_type="ift", ift_prediction=prediction, ift_lambda=0.5, learning_rate=1e-2, max_steps=6)
    logs = step_logs(trainer)
    assert all(entry["ift/lambda"] == 0.5 for entry in logs)
    # Mixing in predictions changes the inputs, so the mixed NLL differs from the teacher-forced one
    assert logs[0]["ift/nll_mixed"] != pytest.approx(logs[0]["ift/nll_teacher_forced"], rel=1e-4)
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"]
    assert logs[-1]["ift/nll_teacher_forced"] < logs[0]["ift/nll_teacher_forced"]
    assert {"entropy", "mean_token_accuracy"} <= set(logs[-1])  # TRL's metrics, from the mixed forward


def test_ift_linear_lambda_schedule_and_resume(tiny_model_dir, preference_dataset, tmp_path):
    schedule = dict(loss_type="ift", ift_lambda=0.4, ift_lambda_min=0.0, ift_lambda_schedule="linear",
                    ift_lambda_warmup_steps=4, max_steps=6, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2)
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "full", **schedule)
    # Updated once per optimizer step: 0, 0.1, 0.2, 0.3, then 0.4
    assert [entry["ift/lambda"] for entry in step_logs(trainer)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])

    resumed = SFTTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                         args=make_config(SFTConfig, tmp_path / "resumed", save_strategy="steps", save_steps=2,
                                          **schedule))
    resumed.train()
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert [entry["ift/lambda"] for entry in step_logs(resumed)][-4:] == pytest.approx([0.2, 0.3, 0.4, 0.4])


def test_ift_with_lora(tiny_model_dir, preference_dataset, tmp_path):
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path, {"peft_config": LORA},
                    loss_type="ift", learning_rate=1e-2, max_steps=4)
    logs = step_logs(trainer)
    assert logs[-1]["ift/nll_teacher_forced"] < logs[0]["ift/nll_teacher_forced"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"loss_type": "ift", "ift_lambda": 1.5}, r"`ift_lambda` must be in \[0, 1\], got 1.5"),
        ({"loss_type": "ift", "ift_gamma": -0.1}, r"`ift_gamma` must be in \[0, 1\], got -0.1"),
        ({"loss_type": "ift", "ift_prediction": "sampled"},
         r"Unknown `ift_prediction` 'sampled'. Valid values: \['greedy', 'soft'\]"),
    ],
)
def test_bad_ift_config_is_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        make_config(SFTConfig, tmp_path, **config)


@pytest.mark.parametrize("loss", [{"loss_type": "kl_sft", "kl_coef": 1.0}, {"loss_type": "ift", "ift_lambda": 0.5}])
def test_padding_free_batch_gives_the_padded_batch_loss(tiny_model_dir, preference_dataset, tmp_path, loss):
    """With packing, TRL lays the sequences end to end in one row: per-sequence reductions must not mix them."""
    trainer = SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path, **loss),
                         train_dataset=preference_dataset.select(range(4)))
    trainer.model.train()
    with torch.no_grad():  # move the policy away from the frozen reference, so the KL penalty is not 0
        trainer.model.model.layers[0].mlp.down_proj.weight.add_(0.1)
    # Different lengths, so that padding and packing lay them out differently
    examples = [{key: trainer.train_dataset[i][key][: 20 + 6 * i] for key in ("input_ids", "labels")}
                for i in range(4)]
    padded = trainer.data_collator(examples)
    packed = dataclasses.replace(trainer.data_collator, padding_free=True, pad_to_multiple_of=128)(examples)
    assert packed["input_ids"].shape == (1, 128) and "attention_mask" not in packed
    losses, metrics = [], []
    for batch in (padded, packed):
        losses.append(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)).item())
        metrics.append({key: values.pop() for key, values in trainer._metrics["train"].items() if "/" in key})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert metrics[1] == pytest.approx(metrics[0], rel=1e-4)
    assert metrics[0]["kl/penalty" if loss["loss_type"] == "kl_sft" else "ift/nll_mixed"] > 0


@pytest.mark.parametrize("loss_type", ["kl_sft", "ift"])
def test_4bit_lora(tiny_model_dir, preference_dataset, tmp_path, loss_type):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path,
                    {"peft_config": LORA, "quantization_config": quantization},
                    loss_type=loss_type, learning_rate=1e-2, max_steps=4)
    assert trainer.model.base_model.model.model.layers[0].mlp.up_proj.weight.__class__.__name__ == "Params4bit"
    logs = step_logs(trainer)
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["kl_sft", "ift"])
def test_lora_on_embedded_model(tmp_path, loss_type):
    """SmolLM2 ties its input and output embeddings; IFT reads both."""
    dataset = load_dataset("json", data_files=str(ROOT / "recipes/data/penn_pairs_sample.jsonl"), split="train")
    trainer = train(SFTTrainer, SFTConfig, "embedded:smollm2-135m-instruct", dataset, tmp_path,
                    {"peft_config": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])},
                    loss_type=loss_type, per_device_train_batch_size=8, max_length=64, learning_rate=1e-3,
                    max_steps=3)
    assert trainer.model.get_input_embeddings().weight is trainer.model.get_output_embeddings().weight
    logs = step_logs(trainer)
    assert len(logs) == 3
    if loss_type == "kl_sft":
        assert logs[0]["kl/penalty"] == pytest.approx(0.0, abs=1e-8)
        assert logs[0]["loss"] == pytest.approx(logs[0]["kl/nll"], rel=1e-5)
        assert logs[-1]["kl/penalty"] > 0
        nll = logs[0]["kl/nll"]
    else:
        assert logs[0]["ift/lambda"] == pytest.approx(0.2)
        nll = logs[0]["ift/nll_teacher_forced"]
    # A pretrained model knows English: far below the uniform log(49152) = 10.8 nats per token
    assert 1.0 < nll < 5.0
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.parametrize("kl_penalty", ["sq_logratio", "token_kl"])
@pytest.mark.parametrize("peft", [False, True], ids=["frozen_copy", "peft"])
def test_kl_sft_precomputed_reference_matches_on_the_fly(tiny_model_dir, preference_dataset, tmp_path, kl_penalty,
                                                         peft):
    trainer_kwargs = {"peft_config": LORA} if peft else {}
    common = dict(loss_type="kl_sft", kl_penalty=kl_penalty, kl_coef=1.0, learning_rate=1e-2, max_steps=4)
    on_the_fly = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "fly", trainer_kwargs,
                       **common)
    precomputed = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "pre", trainer_kwargs,
                        precompute_ref_log_probs=True, **common)
    assert precomputed.ref_model is None
    for fly, pre in zip(step_logs(on_the_fly), step_logs(precomputed), strict=True):
        for key in ("loss", "kl/penalty", "logps/ref", "logps/policy"):
            assert pre[key] == pytest.approx(fly[key], rel=1e-4, abs=1e-6), key


def test_kl_sft_precomputed_reference_in_mixed_precision(tiny_model_dir, preference_dataset, tmp_path):
    """Precomputed before `train()` prepares the model, the reference's log-probs are in the training's bf16 autocast
    too: at the first step the policy is the reference, and the penalty is 0."""
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path, {"peft_config": LORA},
                    loss_type="kl_sft", kl_coef=1.0, precompute_ref_log_probs=True, bf16=True, use_cpu=True,
                    max_steps=1)
    assert step_logs(trainer)[0]["kl/penalty"] == 0.0


def test_a_ref_model_whose_log_probs_are_precomputed_is_freed(tiny_model_dir, preference_dataset, tmp_path):
    """With the reference's log-probs precomputed, nothing of trl_ext's keeps the `ref_model` passed alive."""
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    alive = weakref.ref(ref_model)
    trainer = SFTTrainer(model=tiny_model_dir, ref_model=ref_model, train_dataset=preference_dataset,
                         args=make_config(SFTConfig, tmp_path, loss_type="kl_sft", precompute_ref_log_probs=True))
    del ref_model
    gc.collect()
    assert alive() is None and "ref_token_logps" in trainer.train_dataset.column_names


def test_precompute_with_ift_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`precompute_ref_log_probs=True` is for `loss_type='kl_sft'`"):
        make_config(SFTConfig, tmp_path, loss_type="ift", precompute_ref_log_probs=True)


def test_kl_sft_precomputed_reference_in_evaluation(tiny_model_dir, preference_dataset, tmp_path):
    trainer = SFTTrainer(model=tiny_model_dir, train_dataset=preference_dataset,
                         eval_dataset=preference_dataset.select(range(8)),
                         args=make_config(SFTConfig, tmp_path, loss_type="kl_sft", precompute_ref_log_probs=True,
                                          learning_rate=1e-2, max_steps=4))
    before = trainer.evaluate()
    assert before["eval_kl/penalty"] == pytest.approx(0.0, abs=1e-8)
    assert before["eval_logps/ref"] == pytest.approx(before["eval_logps/policy"], abs=1e-5)
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_kl/penalty"] > 0
    assert after["eval_logps/ref"] == pytest.approx(before["eval_logps/ref"], abs=1e-5)  # stored, not recomputed


@pytest.mark.parametrize("loss_type", ["kl_sft", "ift"])
def test_gradient_accumulation_matches_full_batch(tiny_model_dir, preference_dataset, tmp_path, loss_type):
    common = dict(loss_type=loss_type, kl_coef=1.0, learning_rate=1e-2, max_steps=3)
    full = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "full",
                 per_device_train_batch_size=8, **common)
    accumulated = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "accumulated",
                        per_device_train_batch_size=4, gradient_accumulation_steps=2, **common)
    for full_entry, accumulated_entry in zip(step_logs(full), step_logs(accumulated), strict=True):
        assert accumulated_entry["loss"] == pytest.approx(full_entry["loss"], rel=1e-4)
        assert accumulated_entry["grad_norm"] == pytest.approx(full_entry["grad_norm"], rel=1e-3)


def test_precomputed_full_fine_tuning_refuses_new_eval_data_after_training(tiny_model_dir, preference_dataset,
                                                                           tmp_path):
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path,
                    loss_type="kl_sft", precompute_ref_log_probs=True, max_steps=1)
    with pytest.raises(ValueError, match="no reference model is left"):
        trainer.evaluate(preference_dataset)  # a preference dataset, mapped to `chosen` as in the constructor


def test_kl_sft_reference_is_the_adapter_the_model_arrives_with(tiny_model_dir, preference_dataset, tmp_path):
    """Continuing from a trained adapter: the reference is that adapter, not the base model under it."""
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LORA)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    trained.save_pretrained(tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter",
                                      is_trainable=True)
    trainer = train(SFTTrainer, SFTConfig, model, preference_dataset, tmp_path / "run",
                    loss_type="kl_sft", kl_coef=1.0, learning_rate=1e-2, max_steps=4)
    logs = step_logs(trainer)
    assert logs[0]["kl/penalty"] == pytest.approx(0.0, abs=1e-10)  # with the adapter disabled it would not be
    assert logs[0]["logps/policy"] == pytest.approx(logs[0]["logps/ref"], abs=1e-6)
    assert logs[-1]["kl/penalty"] > 0
    assert logs[-1]["logps/ref"] == pytest.approx(logs[0]["logps/ref"], rel=0.02)  # the copy stays frozen
    reference_parameters = [p for name, p in trainer.model.named_parameters() if ".ref." in name]
    assert reference_parameters and not any(p.requires_grad for p in reference_parameters)


@pytest.mark.parametrize("reference", ["peft_adapter_disabled", "starting_adapter"])
def test_kl_sft_reference_through_the_policy_runs_without_dropout(tiny_model_dir, preference_dataset, tmp_path,
                                                                  reference):
    """The policy serving as the reference (its adapter disabled, or the adapter it arrived with) runs that pass
    without the base model's or the adapters' dropout, as a separate reference does, and goes on training after."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.3)
    lora = dataclasses.replace(LORA, lora_dropout=0.5)
    trainer_kwargs = {"peft_config": lora}
    if reference == "starting_adapter":
        model, trainer_kwargs = get_peft_model(model, lora), {}
    trainer = SFTTrainer(model=model, args=make_config(SFTConfig, tmp_path, loss_type="kl_sft"),
                         train_dataset=preference_dataset, **trainer_kwargs)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    first, second = (reference_token_logps(trainer, batch) for _ in range(2))
    assert trainer.model.training and first.abs().sum() > 0
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["kl_sft", "ift"])
def test_a_packed_batch_without_a_target_token_adds_nothing(tiny_model_dir, preference_dataset, tmp_path, loss_type):
    """A padding-free micro-batch whose one sequence has no target (packing truncates a row down to its prompt):
    TRL's NLL is 0, and so is the registered loss's term, not NaN."""
    trainer = SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path, loss_type=loss_type),
                         train_dataset=preference_dataset)
    example = {key: trainer.train_dataset[0][key] for key in ("input_ids", "labels")}
    example["labels"] = [-100] * len(example["labels"])
    batch = dataclasses.replace(trainer.data_collator, padding_free=True)([example])
    trainer.current_gradient_accumulation_steps = 1  # as `train()` sets it
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch), num_items_in_batch=torch.tensor(0))
    assert loss.item() == 0.0


def test_soft_ift_with_an_adapter_on_the_embeddings_is_refused(tiny_model_dir, preference_dataset, tmp_path):
    """The adapted embedding layer's output is not the weight's rows that soft prediction weights; greedy prediction
    runs the layer itself."""
    lora = dataclasses.replace(LORA, target_modules=["q_proj", "v_proj", "embed_tokens"])
    with pytest.raises(ValueError, match=r"`ift_prediction='soft'` weights the rows of the embedding matrix, but this "
                                         r"model's embedding layer is `peft.tuners.lora.layer.Embedding` .* use "
                                         r"`ift_prediction='greedy'`"):
        SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path, loss_type="ift", ift_prediction="soft"),
                   train_dataset=preference_dataset, peft_config=lora)
    trainer = train(SFTTrainer, SFTConfig, tiny_model_dir, preference_dataset, tmp_path / "greedy",
                    {"peft_config": lora}, loss_type="ift", ift_prediction="greedy", max_steps=1)
    assert step_logs(trainer)[0]["loss"] > 0
