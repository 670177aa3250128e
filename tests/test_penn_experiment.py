"""The Penn experiment recipe end to end with `--quick` (its judge: tests/test_scorers.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("penn_experiment", ROOT / "recipes" / "penn_experiment.py")
penn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(penn)

OUTPUT_FILES = ["report.md", "results.json", "alignment_accuracy.png", "loss_curves.png", "rewards_dpo.png",
                "rewards_dpop.png", "rewards_trl_dpo.png", "objective_metrics.png", "alignment_accuracy_curves.png"]


def parse(args: list[str]) -> "penn.PennArguments":
    """What `python recipes/penn_experiment.py ARGS` passes to `main`."""
    (penn_args,) = penn.parse_args(args)
    return penn_args


def check_outputs(output_dir: Path, methods) -> dict:
    for name in OUTPUT_FILES:
        assert (output_dir / name).stat().st_size > 0, name
    results = json.loads((output_dir / "results.json").read_text())
    assert list(results["metrics"]) == list(methods)
    for method, metrics in results["metrics"].items():
        for key in penn.METRICS:
            assert isinstance(metrics[key], float), (method, key)
        assert 0 <= metrics["alignment_accuracy"] <= 1
        assert (metrics["final_chosen_reward"] is None) == (method not in penn.DPO_FAMILY)
        if method != "base":
            assert any((output_dir / method / "model").glob("adapter_model.safetensors"))
    assert {"torch", "trl", "transformers", "trl_ext"} <= set(results["versions"])
    table = (output_dir / "report.md").read_text()
    assert all(f"| {method} |" in table for method in methods)
    for method in set(methods) - {"base"}:
        check_curve(output_dir, results["methods"][method])
    return results


def check_curve(output_dir: Path, result: dict) -> None:
    """--quick: the alignment-accuracy curve has points at steps 0, 2 and 4 on all 16 test prompts; its last point
    generated what the final evaluation did (same prompts, seed and decoding), so it scores the same."""
    curve = [entry for entry in result["log_history"] if penn.CURVE_KEY in entry]
    assert [entry["step"] for entry in curve] == [0, 2, 4]
    assert curve[-1][penn.CURVE_KEY] == result["alignment_accuracy"]
    rows = [json.loads(line) for line in (output_dir / result["method"] / "eval_generations.jsonl").open()]
    assert [row["completion"] for row in rows if row["step"] == 4] == result["completions"]


@pytest.mark.e2e
def test_quick_run_on_tiny_model_then_resume(tiny_model_dir, tmp_path):
    args = ["--quick", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
            "--lora_target_modules", "q_proj", "v_proj"]
    results = penn.main(parse(args))
    check_outputs(tmp_path, penn.METHODS)
    # A rerun skips every finished method; --overwrite redoes the one asked for
    stamps = {method: (tmp_path / method / "result.json").stat().st_mtime_ns for method in penn.METHODS}
    penn.main(parse(args))
    assert {method: (tmp_path / method / "result.json").stat().st_mtime_ns for method in penn.METHODS} == stamps
    again = penn.main(parse([*args, "--methods", "sft", "--overwrite"]))
    assert (tmp_path / "sft" / "result.json").stat().st_mtime_ns != stamps["sft"]
    # The redone method is deterministic: the same seed trains the same adapter, which samples the same text. (Its
    # alignment accuracy would compare two zeros on this model; its completions are stored in results.json.)
    completions = results["methods"]["sft"]["completions"]
    assert len(completions) == 16 and any(completion.strip() for completion in completions)  # --quick: 16 prompts
    assert again["methods"]["sft"]["completions"] == completions
    stored = json.loads((tmp_path / "results.json").read_text())["methods"]["sft"]["completions"]
    assert stored == completions


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"Unknown `methods` \['rlhf'\]"):
        parse(["--methods", "sft", "rlhf"])


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_run_on_embedded_model(tmp_path):
    penn.main(parse(["--quick", "--output_dir", str(tmp_path)]))
    check_outputs(tmp_path, penn.METHODS)
