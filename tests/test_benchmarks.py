"""`benchmarks/run.py --smoke`: the output's structure, not its numbers."""

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
        ("dpo", "dpop_norm"), ("sft", "trl nll"), ("sft", "trl nll A/A"), ("sft", "kl_sft"),
        ("sft", "kl_sft precomputed"), ("sft", "ift greedy"), ("sft", "ift soft"),
    ]
    for row in rows:
        assert row["step_s"] > 0 and row["peak_mib"] > 0
        assert row["step_ratio"] > 0 and row["memory_ratio"] > 0
    assert rows[0]["step_ratio"] == rows[0]["memory_ratio"] == 1.0  # the baseline divides by itself
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2].startswith("| family | model | seq | setup | contender | step s | step ratio")
    assert len([line for line in table if line.startswith("| dpo") or line.startswith("| sft")]) == 11
