"""GenerationEvalCallback on the tiny model: what it logs, when, and that it leaves training alone."""

import json

import pytest
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_ext
from trl_ext.generation_eval import GenerationEvalCallback, generate_completions, in_prompt_order
from trl_ext.scorers import Generations, RegexMatch

from .conftest import LORA, OPENERS, make_config, step_logs


class MeanCharacters:
    """A hand-made scorer: the mean length of the completions in characters."""

    name = "mean_characters"

    def __call__(self, generations: Generations) -> float:
        return sum(map(len, generations.completions)) / len(generations.completions)


class Step:
    name = "step"

    def __call__(self, generations: Generations) -> float:
        return generations.step


def train_with_callback(trainer_cls, config_cls, tiny_model_dir, dataset, tmp_path, **callback_kwargs):
    trainer = trainer_cls(model=tiny_model_dir, args=make_config(config_cls, tmp_path, max_steps=5),
                          train_dataset=dataset, peft_config=LORA)
    callback = GenerationEvalCallback(trainer, OPENERS[:6], [MeanCharacters(), Step(), RegexMatch(r"\bthe\b")],
                                      eval_every=2, max_new_tokens=8, batch_size=4,
                                      generation_kwargs={"do_sample": True, "temperature": 1.0}, **callback_kwargs)
    trainer.add_callback(callback)
    trainer.train()
    return trainer


def generated_rows(tmp_path) -> dict[int, list[dict]]:
    by_step = {}
    for line in (tmp_path / "eval_generations.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], []).append(row)
    return by_step


@pytest.fixture(scope="module")
def trl_ext_run(tiny_model_dir, preference_dataset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("with-callback")
    return train_with_callback(trl_ext.DPOTrainer, trl_ext.DPOConfig, tiny_model_dir, preference_dataset,
                               output_dir), output_dir


def check_logged_scores(trainer, output_dir):
    logged = [entry for entry in trainer.state.log_history if "eval_gen/step" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4, 5]  # start, every 2 steps, the end (5 is not a multiple)
    assert [entry["eval_gen/step"] for entry in logged] == [0, 2, 4, 5]
    rows = generated_rows(output_dir)
    assert list(rows) == [0, 2, 4, 5]
    for entry in logged:
        completions = [row["completion"] for row in rows[entry["step"]]]
        assert [row["prompt"] for row in rows[entry["step"]]] == OPENERS[:6]
        assert entry["eval_gen/mean_characters"] == pytest.approx(sum(map(len, completions)) / 6)
        assert entry["eval_gen/alignment_accuracy"] == sum(" the " in f" {text} " for text in completions) / 6
    assert any(rows[0][i]["completion"] != rows[5][i]["completion"] for i in range(6))  # the policy moved


def test_logs_each_scorer_at_start_every_n_steps_and_end(trl_ext_run):
    check_logged_scores(*trl_ext_run)


def test_works_with_trl_trainers(tiny_model_dir, preference_dataset, tmp_path):
    check_logged_scores(train_with_callback(trl.DPOTrainer, trl.DPOConfig, tiny_model_dir, preference_dataset,
                                            tmp_path), tmp_path)


def test_training_is_the_same_with_and_without_the_callback(trl_ext_run, tiny_model_dir, preference_dataset,
                                                             tmp_path):
    """Generation runs in a forked RNG and logs outside TRL's metric buffers and without swallowing a step's
    training log: the training logs do not change."""
    without = trl_ext.DPOTrainer(model=tiny_model_dir, args=make_config(trl_ext.DPOConfig, tmp_path, max_steps=5),
                                 train_dataset=preference_dataset, peft_config=LORA)
    without.train()
    assert len(step_logs(without)) == 5
    assert step_logs(trl_ext_run[0]) == step_logs(without)


def test_sft_trainer_with_chat_prompts(tiny_model_dir, preference_dataset, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    trainer = trl_ext.SFTTrainer(model=tiny_model_dir, args=make_config(trl_ext.SFTConfig, tmp_path, max_steps=1),
                                 train_dataset=preference_dataset, processing_class=tokenizer)
    messages = [[{"role": "user", "content": opener}] for opener in OPENERS[:3]]
    trainer.add_callback(GenerationEvalCallback(trainer, messages, [MeanCharacters()], max_new_tokens=4))
    trainer.train()
    rows = generated_rows(tmp_path)
    assert list(rows) == [0, 1] and rows[0][0]["prompt"] == messages[0]


def test_completions_do_not_depend_on_the_number_of_processes(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    kwargs = dict(max_new_tokens=6, batch_size=3, seed=7, generation_kwargs={"do_sample": True})
    single = generate_completions(model, tokenizer, OPENERS[:8], **kwargs)
    shares = [generate_completions(model, tokenizer, OPENERS[:8], process_index=rank, num_processes=2, **kwargs)
              for rank in (0, 1)]
    assert [index for index, _ in shares[0]] == [0, 2] and [index for index, _ in shares[1]] == [1]
    assert in_prompt_order(shares[1] + shares[0]) == in_prompt_order(single)
    assert len(in_prompt_order(single)) == 8 and tokenizer.padding_side == "right"  # restored
    other_seed = generate_completions(model, tokenizer, OPENERS[:8], **{**kwargs, "seed": 8})
    assert in_prompt_order(other_seed) != in_prompt_order(single)


def test_left_padding_generates_as_one_prompt_alone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["The sun", "After a long week of classes at the"]  # different lengths: the first is padded
    batched = in_prompt_order(generate_completions(model, tokenizer, prompts, max_new_tokens=5, batch_size=2))
    alone = [in_prompt_order(generate_completions(model, tokenizer, [prompt], max_new_tokens=5))[0]
             for prompt in prompts]
    assert batched == alone


@pytest.mark.parametrize(("kwargs", "error"), [
    (dict(prompts=[]), "at least one prompt"),
    (dict(eval_every=0), r"`eval_every` must be .* >= 1"),
    (dict(scorers=[MeanCharacters(), MeanCharacters()]), "distinct `name`s"),
    (dict(scorers=[len]), "distinct `name`s"),
])
def test_bad_arguments_are_refused(kwargs, error, tiny_model_dir, preference_dataset, tmp_path):
    trainer = trl_ext.DPOTrainer(model=tiny_model_dir, args=make_config(trl_ext.DPOConfig, tmp_path),
                                 train_dataset=preference_dataset)
    arguments = {"prompts": OPENERS[:2], "scorers": [MeanCharacters()], **kwargs}
    with pytest.raises(ValueError, match=error):
        GenerationEvalCallback(trainer, arguments.pop("prompts"), arguments.pop("scorers"), **arguments)
