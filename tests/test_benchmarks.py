"""The benchmarks: exact FLOP ratios, and the structure of `run.py`'s and `gpu_suite.py`'s output (never timings)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_benchmark_smoke_run_writes_complete_results(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks/run.py"), "--smoke", "--output_dir", str(tmp_path),
                    "--cache", str(tmp_path / "cache")], check=True, capture_output=True, cwd=ROOT)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "cpu_count", "torch", "transformers", "trl"} <= set(results["machine"])
    rows = results["results"]
    prefix = ["trl sigmoid", "trl sigmoid A/A", "sigmoid + prefix sharing", "dpop + prefix sharing"]
    assert [(row["family"], row["rows"], row["contender"]) for row in rows] == [
        *(("dpo", "synthetic", name) for name in ("trl sigmoid", "trl sigmoid A/A", "trl_ext sigmoid", "dpop",
                                                  "dpop_norm", "cdpo", "rdpo", "beta_dpo", "npo", "tdpo1", "tdpo2",
                                                  "sdpo")),
        *(("prefix", "stack_exchange", name) for name in prefix), *(("prefix", "penn", name) for name in prefix),
        *(("sft", "synthetic", name) for name in ("trl nll", "trl nll A/A", "kl_sft", "kl_sft precomputed",
                                                  "ift greedy", "ift soft")),
    ]
    for row in rows:
        assert row["step_s"] > 0 and row["peak_mib"] > 0
        assert row["step_ratio"] > 0 and row["memory_ratio"] > 0 and row["flops"] > 0
        # Prefix sharing runs each prompt once: fewer FLOPs than TRL, on either shape; nothing else does fewer
        assert (row["flop_ratio"] < 1) if "prefix sharing" in row["contender"] else (row["flop_ratio"] >= 1)
    assert rows[0]["step_ratio"] == rows[0]["memory_ratio"] == 1.0  # the baseline divides by itself
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2].startswith("| family | model | seq | rows | setup | contender | GFLOP/step | FLOP ratio | step s |")
    assert len([line for line in table if line.startswith(("| dpo", "| prefix", "| sft"))]) == 26


@pytest.mark.e2e
def test_flops_only_run_counts_without_timing(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks/run.py"), "--flops_only", "--families", "dpo", "--models",
                    "tiny", "--seq_lens", "128", "--setups", "peft", "--output_dir", str(tmp_path), "--cache",
                    str(tmp_path / "cache")], check=True, capture_output=True, cwd=ROOT)
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    contenders = load_benchmark().CONTENDERS["dpo"]
    assert [row["contender"] for row in rows] == list(contenders) and all(row["flops"] > 0 for row in rows)
    assert {row["flop_ratio"] for row in rows if not row["contender"].startswith("tdpo")} == {1.0}
    assert not {"step_s", "step_ratio", "peak_mib", "memory_ratio"} & {key for row in rows for key in row}
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| dpo")]
    assert len(table) == len(contenders)
    assert all(line.endswith("| 1.000 | - | - | - | - |  |") for line in table if "| tdpo" not in line)


def load_benchmark(name: str = "run"):
    return importlib.import_module(name)  # benchmarks/ is on the tests' path, as on a script's


# TDPO's extra FLOPs are the same on every device; TRL's step is not: on a device with Triton, TRL's fused LM head
# scores the completion positions only (`compact` in `trl.trainer.utils.add_fused_lm_head`), elsewhere every position;
# and attention runs other kernels (float32 on CUDA, this model: SDPA's math path, two batched products forward and
# four backward, where the CPU's fused kernel also recomputes the scores). CUDA (H200, torch 2.11, transformers 5.17)
# counted 1.137 before `addmm_` was counted; with the LM head's hidden-state gradient over the 192 positions, 1.133.
TDPO_PEFT_FLOP_RATIO = {"cpu": 1.108, "cuda": 1.133}


@pytest.mark.parametrize(("family", "setup"), [("dpo", "peft"), ("dpo", "precomputed"), ("sft", "peft"),
                                             ("prefix", "peft"), ("prefix", "precomputed")])
def test_flops_of_a_step_against_trl(tmp_path, family, setup):
    """Exact counts: a change that adds a forward to a trl_ext loss fails here instead of hiding in timing noise."""
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--smoke", "--cache", str(tmp_path)])
    shape = benchmark.FAMILY_ROWS[family][0]
    trainers = {name: benchmark.build_trainer(family, name, "tiny", 128, setup, args, shape=shape)
                for name in benchmark.contenders(family, setup)}
    flops = benchmark.flop_ratios((name, benchmark.make_step(trainer)) for name, trainer in trainers.items())
    ratios = {name: row["flop_ratio"] for name, row in flops.items()}
    if family == "prefix":  # stack-exchange-shaped rows: a prompt of half the length, computed once instead of twice
        assert ratios["trl sigmoid A/A"] == 1.0
        assert ratios["sigmoid + prefix sharing"] == ratios["dpop + prefix sharing"] < 0.9
        return
    if family == "dpo":
        # TDPO: each model's LM head once more at the N completion positions, 2 N H V FLOPs each, both rerun in the
        # backward pass (the chunk's activation checkpointing), plus the gradient of the policy's hidden states (the
        # frozen head gets no weight gradient under LoRA): 5 x 2 N H V. TDPO refuses precomputed log-probs.
        config, batch = trainers["trl sigmoid"].model.config, next(iter(trainers["trl sigmoid"].get_train_dataloader()))
        positions = int(batch["completion_mask"][:, 1:].sum())
        tdpo = {name: flops.pop(name)["flops"] - flops["trl sigmoid"]["flops"] for name in ("tdpo1", "tdpo2")
                if name in flops}
        assert tdpo == ({} if setup == "precomputed" else {
            "tdpo1": 10 * positions * config.hidden_size * config.vocab_size,
            "tdpo2": 10 * positions * config.hidden_size * config.vocab_size})
        if setup == "peft":  # 192 positions, H 32, V 320
            device = trainers["trl sigmoid"].args.device.type
            assert round(ratios["tdpo1"], 3) == round(ratios["tdpo2"], 3) == TDPO_PEFT_FLOP_RATIO[device]
        # The rest run the same two forwards TRL runs (one with precomputed reference log-probs), nothing more; sDPO
        # between stage boundaries too
        assert {name: row["flop_ratio"] for name, row in flops.items()} == {
            "trl sigmoid": 1.0, "trl sigmoid A/A": 1.0, "trl_ext sigmoid": 1.0, "dpop": 1.0, "dpop_norm": 1.0,
            "cdpo": 1.0, "rdpo": 1.0, "beta_dpo": 1.0, "npo": 1.0, "sdpo": 1.0}
        return
    assert ratios["trl nll A/A"] == ratios["kl_sft precomputed"] == 1.0  # no reference forward while training
    # One extra forward without gradient: a third of a forward + backward (IFT's first pass skips the prompt's LM head)
    assert 1.25 < ratios["kl_sft"] < 1.5
    assert 1.15 < ratios["ift greedy"] <= ratios["ift soft"] < 1.5


def counted_flops(function, formulas: dict | None = None) -> int:
    with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
        function()
    return counter.get_total_flops()


def test_flop_formulas_count_the_products_torch_leaves_out():
    """Each product counted as `aten.mm` counts one, 2 M N K: TRL's LM-head gradient accumulation with
    `addmm(out_dtype=float32)` (CUDA only: meta tensors; torch's own formula fails on it) and with `addmm_`."""
    formulas = load_benchmark().flop_formulas()
    m, k, n = 6, 128, 10
    acc = torch.zeros(m, n, device="meta")
    a, b = (torch.zeros(shape, device="meta", dtype=torch.bfloat16) for shape in ((m, k), (k, n)))
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        meta_kernel = True
    except TypeError:  # torch 2.9's meta kernel takes the dtype for `beta`; CUDA's runs
        meta_kernel = False
    if meta_kernel:
        with pytest.raises(TypeError, match="out_shape"):
            counted_flops(lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc))
        assert counted_flops(lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc), formulas) == (
            2 * m * n * k)
    assert counted_flops(lambda: torch.zeros(m, n).addmm_(torch.ones(m, k), torch.ones(k, n)), formulas) == (
        2 * m * n * k)


def test_flop_formulas_count_four_bit_products():
    """A 4-bit layer's forward is bitsandbytes' `gemm_4bit` on every device from 0.50 (torch counts none of it;
    earlier releases dequantize and run aten's product, which torch counts), its backward a dequantized `aten.mm`;
    the CPU's no-gradient kernel `gemv_4bit` from 0.47 (meta tensors: AVX512-BF16 only)."""
    import bitsandbytes

    formulas = load_benchmark().flop_formulas()
    m, k, n = 6, 128, 10  # M = 2 x 3 positions
    torch.manual_seed(0)
    layer = bitsandbytes.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(k, n, bias=False).state_dict())
    layer = layer.to("cpu")  # quantizes
    inputs = torch.randn(2, 3, k, requires_grad=True)
    forward_uncounted = hasattr(torch.ops.bitsandbytes, "gemm_4bit")
    assert counted_flops(lambda: layer(inputs).sum().backward()) == (1 if forward_uncounted else 2) * 2 * m * n * k
    assert counted_flops(lambda: layer(inputs).sum().backward(), formulas) == 2 * (2 * m * n * k)
    with torch.no_grad():
        assert counted_flops(lambda: layer(inputs), formulas) == 2 * m * n * k
    if not hasattr(torch.ops.bitsandbytes, "gemv_4bit"):
        return
    packed = torch.zeros(n * k // 2, 1, dtype=torch.uint8, device="meta")
    absmax, code = torch.zeros(n * k // 64, device="meta"), torch.zeros(16, device="meta")
    inputs = torch.zeros(1, 1, k, dtype=torch.bfloat16, device="meta")  # a vector: one position
    out = torch.empty(1, 1, n, dtype=torch.bfloat16, device="meta")
    assert counted_flops(lambda: torch.ops.bitsandbytes.gemv_4bit(inputs, packed, [n, k], absmax, code, 64),
                         formulas) == 2 * n * k
    assert counted_flops(lambda: torch.ops.bitsandbytes.gemv_4bit.out(inputs, packed, [n, k], absmax, code, 64,
                                                                      out=out), formulas) == 2 * n * k


def test_flop_formulas_count_cpu_attention_as_cuda_attention():
    """The CPU's fused attention by torch's formulas for the CUDA kernels: `Q K^T` and `P V` forward (2 products of
    2 B H S^2 D), the scores recomputed and 4 products backward (5)."""
    formulas = load_benchmark().flop_formulas()
    batch, heads, length, dim = 2, 4, 16, 8
    query, key, value = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))

    def attention():
        torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True).sum().backward()

    assert counted_flops(attention) == 0
    assert counted_flops(attention, formulas) == (2 + 5) * 2 * batch * heads * length * length * dim
    # Grouped-query attention: each query head's products with its shared key and value head
    key, value = (torch.randn(batch, heads // 2, length, dim, requires_grad=True) for _ in range(2))

    def grouped_attention():
        torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                         enable_gqa=True).sum().backward()

    assert counted_flops(grouped_attention, formulas) == (2 + 5) * 2 * batch * heads * length * length * dim


def test_steps_run_with_gradient_checkpointing_as_train_turns_it_on(tmp_path):
    """transformers turns checkpointing on inside `Trainer.train`, which the benchmark's steps run up to their first
    step: the model checkpoints, and a step recomputes the policy's decoder layers (more FLOPs than without)."""
    benchmark = load_benchmark()
    flops = {}
    for flag in ([], ["--gradient_checkpointing"]):
        args = benchmark.parse_args(["--smoke", "--cache", str(tmp_path), *flag])
        trainer = benchmark.build_trainer("dpo", "dpop", "tiny", 128, "peft", args)
        step = benchmark.make_step(trainer)
        assert trainer.model.is_gradient_checkpointing == bool(flag)
        flops[bool(flag)] = benchmark.step_flops(step)
    assert flops[True] > flops[False]


GPU_SUITE_ROWS = {
    "full": [("dpo", "trl sigmoid"), ("dpo", "trl sigmoid A/A"), ("dpo", "trl_ext sigmoid"), ("dpo", "dpop"),
             ("dpo", "dpop_norm"), ("sft packed", "trl nll"), ("sft packed", "trl nll A/A"), ("sft packed", "kl_sft"),
             ("sft packed", "ift greedy"), ("sft packed", "ift soft"), ("sft precomputed", "trl nll"),
             ("sft precomputed", "kl_sft"), ("sft precomputed", "kl_sft precomputed"), ("dpo prefix", "trl sigmoid"),
             ("dpo prefix", "sigmoid + prefix sharing"), ("dpo prefix", "dpop + prefix sharing")],
    "quick": [("dpo", "trl sigmoid"), ("dpo", "trl sigmoid A/A"), ("dpo", "dpop"), ("sft packed", "trl nll"),
              ("sft packed", "kl_sft"), ("sft packed", "ift greedy"), ("dpo prefix", "trl sigmoid"),
              ("dpo prefix", "sigmoid + prefix sharing")],
}


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["full", "quick"])
def test_gpu_suite_smoke_run(tmp_path, mode):
    """`gpu_suite.py --smoke [--quick]` on a CPU: every block and the CPU pipeline run; FLOP ratios are exact; what
    needs CUDA is recorded as not measured or skipped, never as met or passed; each part's time is recorded."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_suite.py"), "--smoke",
                             *["--quick"] * (mode == "quick"), "--output_dir", str(tmp_path), "--cache",
                             str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    suite = load_benchmark("gpu_suite")
    results = suite.read_results(tmp_path)
    assert {"device", "torch", "trl", "bitsandbytes", "deepspeed", "setting"} <= set(results["machine"])
    rows = {(row["block"], row["contender"]): row for row in results["qlora"]}
    assert list(rows) == GPU_SUITE_ROWS[mode]
    for row in rows.values():
        assert "error" not in row and row["step_s"] > 0 and row["tokens_per_s"] > 0
    # QLoRA: the DPO family runs exactly TRL's forwards
    assert {row["flop_ratio"] for (block, _), row in rows.items() if block == "dpo"} == {1.0}
    assert {row["flop_ratio"] for (_, name), row in rows.items() if name == "trl nll A/A"} <= {1.0}
    assert all(1.1 < row["flop_ratio"] < 1.5 for (_, name), row in rows.items() if name.startswith(("kl_sft", "ift"))
               and name != "kl_sft precomputed")
    # 2 packed rows x 128 tokens of 4 sequences each; 2 pairs cut at 128 tokens
    assert rows["sft packed", "trl nll"]["tokens_per_step"] > 0.9 * 2 * 128
    assert rows["dpo", "dpop"]["targets"] == {name: "not measured (no CUDA device)" for name in (
        "peak allocated < 12 GB", "memory within 1% of TRL", "step time within 2% of TRL")}
    assert rows["dpo", "trl sigmoid"]["targets"] == {}
    # Prefix sharing on stack-exchange-shaped pairs: fewer FLOPs than TRL's two rows per pair
    assert rows["dpo prefix", "sigmoid + prefix sharing"]["flop_ratio"] < 0.9
    assert set(rows["dpo prefix", "sigmoid + prefix sharing"]["targets"]) == {
        "at least 1.3x faster than TRL", "step ratio within 5% of FLOP ratio", "memory at most TRL's"}
    pipeline = {row["step"]: row["status"] for row in results["pipeline"]}
    assert pipeline == {"sft + merge": "passed", "dpop (single_gpu)": "passed", "dpop (deepspeed_zero2)":
                        "skipped: needs CUDA", "dpop (deepspeed_zero3)": "skipped: needs CUDA",
                        "dpop (fsdp)": "skipped: needs CUDA"}
    parts = {row["part"]: row for row in results["parts"]}
    assert list(parts) == list(suite.time_plan(suite.parse_args(["--smoke", *["--quick"] * (mode == "quick")])))
    assert all(row["elapsed_s"] > 0 for name, row in parts.items() if name != "checkpoint build")
    table = (tmp_path / "results.md").read_text()
    assert "| block | contender | GFLOP/step | FLOP ratio | step s | step ratio | tokens/s | peak alloc MiB |" in table
    assert table.count("| dpo |") == len([row for row in rows if row[0] == "dpo"])
    assert table.count("skipped: needs CUDA") == 3 and "| part | planned s (one H200) | took s |" in table
    if mode == "full":  # precomputed KL-SFT runs no forward of its own
        assert rows["sft precomputed", "kl_sft precomputed"]["flop_ratio"] == 1.0




def test_quick_mode_plan_fits_its_budget():
    """The quick mode's plan, from the times seen on one H200, leaves a minute of its 8 for the wheels' install and
    the suite's own start; the full suite plans every block."""
    suite = load_benchmark("gpu_suite")
    quick = suite.time_plan(suite.parse_args(["--quick"]))
    assert list(quick) == ["pipeline", "checkpoint build", "qlora dpo", "qlora sft packed", "qlora dpo prefix"]
    assert sum(quick.values()) <= suite.QUICK_BUDGET_S - 60
    assert quick["checkpoint build"] == 0  # built while the pipeline runs
    full = suite.time_plan(suite.parse_args([]))
    assert list(full) == ["pipeline", "checkpoint build", "qlora dpo", "qlora sft packed", "qlora sft precomputed",
                          "qlora dpo prefix"] and full["qlora dpo"] > quick["qlora dpo"]


def test_results_log_keeps_each_record_as_written(tmp_path):
    """A record is on disk once written, a part that fails still records its time, and the table is made from the
    records alone."""
    suite = load_benchmark("gpu_suite")
    log = suite.ResultsLog(tmp_path)
    log.write("machine", {"device": "GPU", "torch": "2.11", "cuda": "13.0", "transformers": "5.17", "trl": "1.16",
                          "bitsandbytes": "0.50.2", "deepspeed": "0.19.8", "setting": "QLoRA."})
    with pytest.raises(RuntimeError), log.part("qlora dpo", 104.0):
        log.write("qlora", {"block": "dpo", "family": "dpo", "contender": "trl sigmoid", "flops": 4.2e14,
                            "flop_ratio": 1.0, "step_s": 1.1, "targets": {}})
        assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
        raise RuntimeError("killed")
    log.write("pipeline", {"step": "dpop (fsdp)", "config": "accelerate_configs/fsdp.yaml", "status": "passed"})
    results = suite.read_results(tmp_path)
    assert [row["contender"] for row in results["qlora"]] == ["trl sigmoid"]
    assert [(row["part"], row["planned_s"]) for row in results["parts"]] == [("qlora dpo", 104.0)]
    table = suite.markdown(results)
    assert "| dpo | trl sigmoid | 4.2e14 | 1.000 | 1.100 | - |" in table
    assert "| dpop (fsdp) | accelerate_configs/fsdp.yaml | - | passed |" in table and "| qlora dpo | 104 |" in table


def test_gpu_targets_met_missed_or_not_measured():
    suite = load_benchmark("gpu_suite")
    dpop = {"family": "dpo", "contender": "dpop", "peak_allocated_mib": 11000.0, "memory_ratio": 1.005,
            "step_ratio": 1.03}
    assert suite.target_verdicts(dpop, on_cuda=True) == {
        "peak allocated < 12 GB": "met", "memory within 1% of TRL": "met", "step time within 2% of TRL": "missed"}
    over = suite.target_verdicts({**dpop, "peak_allocated_mib": 11500.0}, on_cuda=True)  # 12.06e9 bytes
    assert over["peak allocated < 12 GB"] == "missed"
    failed = {"family": "dpo", "contender": "dpop_norm", "error": "CUDA out of memory"}
    assert suite.target_verdicts(failed, on_cuda=True) == {
        "memory within 1% of TRL": "not measured (failed)", "step time within 2% of TRL": "not measured (failed)"}
    kl_sft = {"family": "sft", "contender": "kl_sft", "flop_ratio": 1.333, "step_ratio": 1.36}
    assert suite.target_verdicts(kl_sft, on_cuda=True) == {"step ratio within 3% of FLOP ratio": "met"}
    assert suite.target_verdicts({**kl_sft, "step_ratio": 1.40}, on_cuda=True) == {
        "step ratio within 3% of FLOP ratio": "missed"}
    assert suite.target_verdicts(kl_sft, on_cuda=False) == {
        "step ratio within 3% of FLOP ratio": "not measured (no CUDA device)"}
    assert suite.target_verdicts({"family": "sft", "contender": "trl nll"}, on_cuda=True) == {}
