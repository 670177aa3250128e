"""`benchmarks/run.py --smoke`: the output's structure, not its numbers."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_benchmark_smoke_run_writes_complete_results(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks/run.py"), "--smoke", "--output_dir", str(tmp_path),
                    "--cache", str(tmp_path / "cache")], check=True, capture_output=True, cwd=ROOT)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "cpu_count", "torch", "transformers", "trl"} <= set(results["machine"])
    rows = results["results"]
    assert [(row["family"], row["contender"]) for row in rows] == [
        ("dpo", "trl sigmoid"), ("dpo", "trl sigmoid A/A"), ("dpo", "trl_ext sigmoid"), ("dpo", "dpop"),
        ("dpo", "dpop_norm"), ("dpo", "cdpo"), ("dpo", "rdpo"), ("dpo", "beta_dpo"), ("dpo", "npo"),
        ("sft", "trl nll"), ("sft", "trl nll A/A"), ("sft", "kl_sft"),
        ("sft", "kl_sft precomputed"), ("sft", "ift greedy"), ("sft", "ift soft"),
    ]
    for row in rows:
        assert row["step_s"] > 0 and row["peak_mib"] > 0
        assert row["step_ratio"] > 0 and row["memory_ratio"] > 0 and row["flops"] > 0 and row["flop_ratio"] >= 1
    assert rows[0]["step_ratio"] == rows[0]["memory_ratio"] == 1.0  # the baseline divides by itself
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2].startswith("| family | model | seq | setup | contender | GFLOP/step | FLOP ratio | step s |")
    assert len([line for line in table if line.startswith("| dpo") or line.startswith("| sft")]) == 15


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_run", ROOT / "benchmarks/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("family", "setup"), [("dpo", "peft"), ("dpo", "precomputed"), ("sft", "peft")])
def test_flops_of_a_step_against_trl(tmp_path, family, setup):
    """Exact counts: a change that adds a forward to a trl_ext loss fails here instead of hiding in timing noise."""
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--smoke", "--cache", str(tmp_path)])
    steps = {name: benchmark.make_step(benchmark.build_trainer(family, name, "tiny", 128, setup, args))
             for name in benchmark.CONTENDERS[family]}
    ratios = {name: row["flop_ratio"] for name, row in benchmark.flop_ratios(steps).items()}
    if family == "dpo":  # the same two forwards TRL runs (one with precomputed reference log-probs), nothing more
        assert ratios == {"trl sigmoid": 1.0, "trl sigmoid A/A": 1.0, "trl_ext sigmoid": 1.0, "dpop": 1.0,
                          "dpop_norm": 1.0, "cdpo": 1.0, "rdpo": 1.0, "beta_dpo": 1.0, "npo": 1.0}
        return
    assert ratios["trl nll A/A"] == ratios["kl_sft precomputed"] == 1.0  # no reference forward while training
    # One extra forward without gradient: a third of a forward + backward (IFT's first pass skips the prompt's LM head)
    assert 1.25 < ratios["kl_sft"] < 1.5
    assert 1.15 < ratios["ift greedy"] <= ratios["ift soft"] < 1.5
