"""The Penn experiment recipe end to end with `--quick` (its judge: tests/test_scorers.py)."""

import json
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

import penn_experiment
from penn import experiment as penn
from penn import judge as penn_judge
from penn.config import DEFAULT_METHODS, MORE_DPO_METHODS, dpo_family
from penn.generation import CURVE_KEY, HELD_OUT_REWARD, METRICS
from penn.report import wilson_interval
from penn.results import data_fingerprint, model_fingerprint, provenance, reusable_result
from penn.seeds import aggregate, seeds_report

OUTPUT_FILES = ["report.md", "results.json", "alignment_accuracy.png", "loss_curves.png", "rewards_dpo.png",
                "rewards_dpop.png", "rewards_trl_dpo.png", "objective_metrics.png", "alignment_accuracy_curves.png"]


def parse(args: list[str]) -> "penn.PennSetup":
    """What `python recipes/penn_experiment.py ARGS` passes to `main`."""
    (setup,) = penn_experiment.parse_args(args)
    return setup


def check_outputs(output_dir: Path, methods) -> dict:
    for name in OUTPUT_FILES:
        assert (output_dir / name).stat().st_size > 0, name
    results = json.loads((output_dir / "results.json").read_text())
    assert list(results["metrics"]) == list(methods)
    for method, metrics in results["metrics"].items():
        for key in METRICS:
            assert isinstance(metrics[key], float), (method, key)
        assert 0 <= metrics["alignment_accuracy"] <= 1
        assert (metrics["final_chosen_reward"] is None) == (method not in dpo_family())
        if method in dpo_family():
            check_held_out_rewards(results["methods"][method])
        if method != "base":
            assert any((output_dir / method / "model").glob("adapter_model.safetensors"))
    assert {"torch", "trl", "transformers", "trl_ext"} <= set(results["versions"])
    table = (output_dir / "report.md").read_text()
    assert all(f"| {method} |" in table for method in methods)
    for method in set(methods) - {"base"}:
        check_curve(output_dir, results["methods"][method])
    return results


def check_held_out_rewards(result: dict) -> None:
    """--quick: the DPO family is evaluated on the curve's held-out pairs at the curve's steps after 0 (at step 0 the
    policy is the reference); the reported final and lowest chosen rewards are those evaluations'."""
    evaluations = [entry for entry in result["log_history"] if HELD_OUT_REWARD in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert result["final_chosen_reward"] == evaluations[-1][HELD_OUT_REWARD]
    assert result["lowest_chosen_reward"] == min(entry[HELD_OUT_REWARD] for entry in evaluations)
    assert all(entry[HELD_OUT_REWARD] != 0 for entry in evaluations)  # the policy has moved


def check_curve(output_dir: Path, result: dict) -> None:
    """--quick: the alignment-accuracy curve has points at steps 0, 2 and 4 on all 16 test prompts; its last point
    generated what the final evaluation did (same prompts, seed and decoding), so it scores the same."""
    curve = [entry for entry in result["log_history"] if CURVE_KEY in entry]
    assert [entry["step"] for entry in curve] == [0, 2, 4]
    assert curve[-1][CURVE_KEY] == result["alignment_accuracy"]
    rows = [json.loads(line) for line in (output_dir / result["method"] / "eval_generations.jsonl").open()]
    assert [row["completion"] for row in rows if row["step"] == 4] == result["completions"]


@pytest.mark.e2e
def test_quick_run_on_tiny_model_then_resume(tiny_model_dir, tmp_path):
    args = ["--quick", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
            "--lora_target_modules", "q_proj", "v_proj"]
    results = penn.main(parse(args))
    check_outputs(tmp_path, DEFAULT_METHODS)
    # A rerun with the same settings reuses every finished method; other settings train the methods they change
    stamps = {method: (tmp_path / method / "result.json").stat().st_mtime_ns for method in DEFAULT_METHODS}
    penn.main(parse(args))
    assert {method: (tmp_path / method / "result.json").stat().st_mtime_ns for method in stamps} == stamps
    penn.main(parse([*args, "--methods", "sft", "dpop", "--dpop_lambda", "7"]))
    assert (tmp_path / "sft" / "result.json").stat().st_mtime_ns == stamps["sft"]
    assert (tmp_path / "dpop" / "result.json").stat().st_mtime_ns != stamps["dpop"]
    assert json.loads((tmp_path / "dpop" / "result.json").read_text())["provenance"]["training"]["dpop_lambda"] == 7
    again = penn.main(parse([*args, "--methods", "sft", "--overwrite"]))
    assert (tmp_path / "sft" / "result.json").stat().st_mtime_ns != stamps["sft"]
    # The redone method is deterministic: the same seed trains the same adapter, which samples the same text. (Its
    # alignment accuracy would compare two zeros on this model; its completions are stored in results.json.)
    completions = results["methods"]["sft"]["completions"]
    assert len(completions) == 16 and any(completion.strip() for completion in completions)  # --quick: 16 prompts
    assert again["methods"]["sft"]["completions"] == completions
    stored = json.loads((tmp_path / "results.json").read_text())["methods"]["sft"]["completions"]
    assert stored == completions


def test_quick_run_of_one_method(tiny_model_dir, tmp_path):
    setup = parse(["--quick", "--methods", "sft", "--model_name_or_path", tiny_model_dir, "--lora_target_modules",
                   "q_proj", "v_proj", "--output_dir", str(tmp_path)])
    assert setup.args.methods == ["sft"] and setup.args.quick and list(setup.training) == ["sft"]
    summary = penn_experiment.main(setup)
    assert list(summary["metrics"]) == ["sft"]
    check_curve(tmp_path, summary["methods"]["sft"])
    assert (tmp_path / "alignment_accuracy_curves.png").stat().st_size > 0


@pytest.mark.e2e
def test_dpo_family_trains_on_the_rows_its_budget_reaches_and_shares_one_reference_precompute(tiny_model_dir,
                                                                                             tmp_path):
    """2 steps x 8 pairs train on 16 of the 32 --quick rows, the same for every method, and every DPO-family method
    starts from the same adapter, so TRL computes their reference log-probs once and caches them for all."""
    setup = parse(["--quick", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--max_steps", "2",
                   "--curve_prompts", "0", "--lora_target_modules", "q_proj", "v_proj"])
    train = penn.load_splits(setup.args)["train"]
    trainers = [penn.train_method(method, setup, tiny_model_dir, train, [], tmp_path / method)
                for method in ("dpo", "dpop", "trl_dpo")]
    assert {len(trainer.train_dataset) for trainer in trainers} == {16}
    # TRL keys its cache file on the rows' fingerprint and the model's hash: one file, read by every method
    cache_files = [{file["filename"] for file in trainer.train_dataset.cache_files} for trainer in trainers]
    assert cache_files[0] == cache_files[1] == cache_files[2]
    assert trainers[0].train_dataset["ref_chosen_logps"] == trainers[2].train_dataset["ref_chosen_logps"]
    # the sequential sampler keeps the recipe's length-grouped layout: the first batch is the first 8 rows
    trainer = trainers[0]
    first_rows = [trainer.train_dataset[index] for index in range(8)]
    first_batch = next(iter(trainer.get_train_dataloader()))
    assert first_batch["input_ids"].tolist() == trainer.data_collator(first_rows)["input_ids"].tolist()


def test_length_grouped_batches_keep_every_row_and_pad_less(tiny_model_dir):
    rows = penn.load_splits(parse([]).args)["train"].select(range(64))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def lengths(dataset):
        return [max(len(tokenizer(row["prompt"] + row[side]).input_ids) for side in ("chosen", "rejected"))
                for row in dataset]

    def positions(lengths):  # what a batch of 8 costs: every row padded to the batch's longest
        return sum(8 * max(lengths[start:start + 8]) for start in range(0, len(lengths), 8))

    grouped = penn.in_length_grouped_batches(rows, 8, seed=0, tokenizer=tokenizer, group_batches=2)
    assert sorted(map(str, grouped)) == sorted(map(str, rows))
    assert positions(lengths(grouped)) < positions(lengths(rows.shuffle(seed=0)))
    assert all(batch == sorted(batch) for batch in (lengths(grouped)[start:start + 8] for start in range(0, 64, 8)))
    assert grouped["prompt"] == penn.in_length_grouped_batches(rows, 8, 0, tokenizer, 2)["prompt"]
    assert grouped["prompt"] != penn.in_length_grouped_batches(rows, 8, 1, tokenizer, 2)["prompt"]
    # one group of all the rows: the fewest positions any layout has
    everything = penn.in_length_grouped_batches(rows, 8, seed=0, tokenizer=tokenizer, group_batches=8)
    assert positions(lengths(everything)) == positions(sorted(lengths(rows)))


def test_length_grouped_batches_of_chat_messages(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
    rows = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "Where did you study?" + " really" * length}] for length in range(16)],
        "chosen": [[{"role": "assistant", "content": "At Penn."}]] * 16,
        "rejected": [[{"role": "assistant", "content": "Nowhere."}]] * 16,
    })
    grouped = penn.in_length_grouped_batches(rows, 4, seed=0, tokenizer=tokenizer, group_batches=4)
    # one group: each batch of 4 holds prompts of 4 consecutive lengths
    batches = [sorted(row["prompt"][0]["content"].count("really") for row in grouped.select(range(start, start + 4)))
               for start in range(0, 16, 4)]
    assert sorted(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_every_methods_options_are_checked_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match=r"kl_sft: argument --kl_penalty.*invalid choice: 'bogus'"):
        penn.main(parse(["--methods", "sft", "kl_sft", "--kl_penalty", "bogus", "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_provenance_keys_each_method_on_what_changes_its_result(tmp_path):
    args, data = parse([]), {"train": "t1", "test": "e1"}
    base = {method: provenance(method, args, data, "m1") for method in ("sft", "dpop")}
    assert base["dpop"]["training"]["dpop_lambda"] == 5 and "dpop_lambda" not in base["sft"]["training"]
    changed = {
        "dpop_lambda": (parse(["--dpop_lambda", "7"]), data, "m1"),
        "learning_rate": (parse(["--learning_rate", "1e-3"]), data, "m1"),
        "judge_model": (parse(["--judge_model", "other"]), data, "m1"),
        "train data": (args, {**data, "train": "t2"}, "m1"),
        "model": (args, data, "m2"),
    }
    affected = {name: [method for method in base if provenance(method, *inputs) != base[method]]
                for name, inputs in changed.items()}
    assert affected == {"dpop_lambda": ["dpop"], "learning_rate": ["sft", "dpop"], "judge_model": [],
                        "train data": ["sft", "dpop"], "model": ["sft", "dpop"]}

    result_file = tmp_path / "result.json"
    assert reusable_result(result_file, base["dpop"]) == (None, "no stored result")
    result_file.write_text(json.dumps({"alignment_accuracy": 0.5, "provenance": base["dpop"]}))
    stored, _ = reusable_result(result_file, base["dpop"])
    assert stored["alignment_accuracy"] == 0.5
    stored, why = reusable_result(result_file, provenance("dpop", *changed["dpop_lambda"]))
    assert stored is None and why == "the stored result came from other settings (training.dpop_lambda: 5.0 -> 7.0)"


def test_data_and_model_fingerprints_follow_content(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "d", "chosen": " e", "rejected": " f"}]
    assert data_fingerprint(Dataset.from_list(rows)) == data_fingerprint(Dataset.from_list(list(rows)))
    assert data_fingerprint(Dataset.from_list(rows)) != data_fingerprint(Dataset.from_list(rows[::-1]))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    first = model_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 9 + b"\1")  # same size, other weights
    assert model_fingerprint(str(tmp_path)) != first


@pytest.mark.parametrize("successes, trials, interval", [
    (5, 10, (0.2366, 0.7634)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (0, 0, (0.0, 1.0)),
])
def test_wilson_interval(successes, trials, interval):
    assert wilson_interval(successes, trials) == pytest.approx(interval, abs=1e-4)


@pytest.mark.e2e
def test_quick_run_of_the_other_dpo_losses(tiny_model_dir, tmp_path):
    penn.main(parse(["--quick", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
                     "--lora_target_modules", "q_proj", "v_proj", "--methods", *MORE_DPO_METHODS]))
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert list(metrics) == list(MORE_DPO_METHODS)
    for method in MORE_DPO_METHODS:
        assert isinstance(metrics[method]["final_chosen_reward"], float), method
        assert metrics[method]["lowest_chosen_reward"] <= metrics[method]["final_chosen_reward"], method
        assert (tmp_path / f"rewards_{method}.png").stat().st_size > 0


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"Unknown `methods` \['rlhf'\]"):
        parse(["--methods", "sft", "rlhf"])


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_run_on_embedded_model(tmp_path):
    penn.main(parse(["--quick", "--output_dir", str(tmp_path)]))
    check_outputs(tmp_path, DEFAULT_METHODS)


def test_seed_summary_is_mean_and_sample_spread():
    no_reward = {"final_chosen_reward": None, "lowest_chosen_reward": None}
    by_seed = {0: {"sft": {"alignment_accuracy": 0.5, "repetition_3gram": 0.1, "distinct_2": 0.4, "fluency_nll": 3.0,
                           "mean_length_words": 10.0, **no_reward}},
               1: {"sft": {"alignment_accuracy": 0.7, "repetition_3gram": 0.1, "distinct_2": 0.6, "fluency_nll": 2.0,
                           "mean_length_words": 12.0, **no_reward}}}
    summary = aggregate(by_seed)["sft"]
    assert "final_chosen_reward" not in summary
    accuracy = summary["alignment_accuracy"]
    assert accuracy["values"] == [0.5, 0.7]
    assert [accuracy[key] for key in ("mean", "std", "min", "max")] == pytest.approx([0.6, 0.1414214, 0.5, 0.7])
    assert summary["repetition_3gram"]["std"] == 0.0
    table = seeds_report({"sft": summary}, [0, 1], "settings")
    assert "| sft | 0.600 ± 0.141 (0.500 to 0.700) | 0.100 ± 0.000 (0.100 to 0.100) |" in table


@pytest.mark.e2e
def test_seeds_repeat_the_comparison(tiny_model_dir, tmp_path):
    args = ["--quick", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--methods", "base",
            "sft", "--lora_target_modules", "q_proj", "v_proj", "--seeds", "0", "1"]
    summary = penn.main(parse(args))
    runs = [json.loads((tmp_path / f"seed-{seed}" / "results.json").read_text()) for seed in (0, 1)]
    assert [run["seed"] for run in runs] == [0, 1]
    for method in ("base", "sft"):
        values = [run["metrics"][method]["distinct_2"] for run in runs]
        assert summary[method]["distinct_2"]["values"] == values
        assert summary[method]["distinct_2"]["mean"] == pytest.approx(sum(values) / 2)
    assert runs[0]["methods"]["sft"]["completions"] != runs[1]["methods"]["sft"]["completions"]
    assert "seeds 0, 1" in (tmp_path / "report.md").read_text()


def test_a_judge_that_cannot_be_reached_is_recorded_not_fatal(monkeypatch):
    import functools
    import socket

    from trl_ext.scorers import judge_win_rate

    monkeypatch.setattr(penn_judge, "judge_win_rate", functools.partial(judge_win_rate, backoff_seconds=0.01))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = parse(["--judge_base_url", f"http://127.0.0.1:{port}/v1", "--judge_pairs", "dpop:sft", "base:dpo"]).args
    results = {method: {"completions": [" at Penn."]} for method in ("sft", "dpop", "base")}
    judged = penn_judge.judge_pairs(args, ["The sun"], results)
    assert list(judged) == ["dpop:sft"]  # `dpo` did not run
    assert judged["dpop:sft"].startswith(f"not judged: The judge at http://127.0.0.1:{port}/v1/chat/completions did "
                                         "not answer after 4 attempts")


def test_report_takes_a_result_stored_before_held_out_rewards():
    """`base`'s provenance did not change when the held-out rewards came, so its older stored result is reused."""
    from penn.report import report

    older = {"alignment_accuracy": 0.5, "repetition_3gram": 0.0, "distinct_2": 0.8, "fluency_nll": 1.6,
             "mean_length_words": 19.0, "wall_seconds": 33.0, "completions": ["a", "b"], "log_history": []}
    text = report({"base": older}, {}, parse(["--methods", "base"]), ["p1", "p2"])
    assert "| base | 0.500 [0.09, 0.91] | 0.000 | 0.800 | 1.600 | 19.0 |  | 33 |" in text
