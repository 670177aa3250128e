"""The costs users meet on a GPU, in one command: QLoRA on a Llama-2-7B-shaped model, and the Llama-2 pipeline through
accelerate's single-GPU, DeepSpeed and FSDP configs. Nothing is downloaded: models are built from configs with random
weights, data are synthetic or the shipped stack-exchange sample.

```bash
python benchmarks/gpu_suite.py --quick                  # a CUDA machine: fits 8 minutes on one H200 (planned 6)
python benchmarks/gpu_suite.py                          # a CUDA machine: the whole suite (planned 13 minutes)
python benchmarks/gpu_suite.py --parts qlora            # only the 7B-shaped QLoRA benchmark (or: --parts pipeline)
python benchmarks/gpu_suite.py --smoke                  # CPU: a tiny Llama shape through the same code, minutes
python benchmarks/gpu_suite.py --smoke --quick          # CPU: the quick mode's blocks at the tiny shape
```

- **qlora**: a Llama-2-7B-shaped model (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000), random
  bf16 weights saved once under `--cache` and loaded in 4-bit NF4 with bf16 compute; LoRA r 8 on q/k/v/o, gradient
  checkpointing turned on by `Trainer.train` as in a user's run (the workers check it is on), paged AdamW (32-bit).
  Blocks, each against its TRL baseline: the DPO family on 4 pairs x 1024 tokens; the SFT family with packing, 4 rows
  x 1024 tokens of about 250-token sequences; and `kl_sft` with precomputed reference log-probs (which refuses
  packing) against `nll` on 4 unpacked 1024-token rows. `--quick` keeps the first two blocks with three contenders
  each. One process per block steps every contender side by side (`benchmarks/run.py`'s paired rounds, FLOPs counted
  first); peak memory comes from one fresh process per contender (`--memory_jobs` at once):
  `torch.cuda.max_memory_allocated` and `max_memory_reserved` after the model is loaded and over `--memory_steps` steps
  (CUDA only: on a CPU `benchmarks/run.py` measures each process's RSS).
- **pipeline** (`benchmarks/gpu_pipeline.py`): the Llama-2 recipes on a small random Llama through `accelerate launch`
  with each config; each step passes when it exits 0, logs finite losses (and DPOP's metrics) and its saved adapter
  loads back and computes finite logits.
- **targets**, per row: met, missed or not measured (CPU, a failed contender): QLoRA DPOP peak allocated under 12 GB;
  every DPO-family contender within 1% of TRL's peak allocated memory and 2% of its step time; every SFT-family step
  time within 3% of its FLOP ratio.

Every row goes to `results.jsonl` in `--output_dir` the moment it is measured (a run stopped by a time limit keeps what
it measured), with the time each part took against its plan; `results.md` is made from those rows at the end and
printed. A contender or step that fails is recorded with its error and the suite goes on; the exit status is 1 if
anything failed. `--smoke` runs on a CPU what a CPU can: the same blocks at a tiny shape in float32 (AdamW in torch,
no memory processes), the pipeline through `accelerate launch --cpu`, the DeepSpeed and FSDP steps recorded as skipped.
"""

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from gpu_pipeline import LAUNCHES, cuda, error_text, pipeline_part
from run import (
    CONTENDERS,
    TOKEN_SHAPES,
    WORDS,
    build_trainer,
    cell,
    machine,
    make_step,
    run_worker,
    side_by_side,
    synthetic_rows,
    token_shaped_rows,
)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=512)
# (family, packing, contenders): each block's first contender is its baseline. The DPO block holds a 7B model per
# contender on one GPU, so it keeps to TRL's loss and DPOP's; run.py covers the other DPO-family losses.
BLOCKS = {
    "dpo": ("dpo", False, ("trl sigmoid", "trl sigmoid A/A", "trl_ext sigmoid", "dpop", "dpop_norm")),
    "sft packed": ("sft", True, tuple(name for name in CONTENDERS["sft"] if name != "kl_sft precomputed")),
    "sft precomputed": ("sft", False, ("trl nll", "kl_sft", "kl_sft precomputed")),
    # Stack-exchange-shaped pairs (prompts of half the length, answers of a quarter): TRL against prefix sharing
    "dpo prefix": ("prefix", False, ("trl sigmoid", "sigmoid + prefix sharing", "dpop + prefix sharing")),
}
QUICK_BLOCKS = {"dpo": ("trl sigmoid", "trl sigmoid A/A", "dpop"), "sft packed": ("trl nll", "kl_sft", "ift greedy"),
                "dpo prefix": ("trl sigmoid", "sigmoid + prefix sharing")}
SEQUENCES_PER_PACK = 4
DPO_MEMORY_LIMIT_BYTES = 12e9  # QLoRA DPOP at 4 x 1024 tokens with checkpointing
# Seconds seen on one H200 (benchmarks/README.md, "GPU suite"), of which the time plan is made. A step: 4 pairs / rows
# x 1024 tokens with gradient checkpointing (one more policy forward than the 0.88 s DPO step seen without it).
SECONDS_SEEN = {"process": 8, "load_7b": 10, "build_7b": 45, "launch": 30, "first_step": 3,
                "step": {"dpo": 1.1, "sft": 0.55, "prefix": 0.85}}  # prefix: TRL's step on 4 x 768 tokens
QUICK_BUDGET_S = 8 * 60


def contenders_of(block: str, args) -> tuple[str, ...]:
    return QUICK_BLOCKS[block] if args.quick else BLOCKS[block][2]


def blocks(args) -> list[str]:
    return list(QUICK_BLOCKS if args.quick else BLOCKS)


def random_checkpoint(shape: dict, cache: Path, dtype: str) -> str:
    """A Llama of `shape` with random `dtype` weights and a byte-level BPE tokenizer, saved once under `cache`.
    Built on the GPU when there is one (a 7B model in bf16: 13.5 GB, never materialized in float32), then loaded in
    4-bit by `from_pretrained`, which quantizes shard by shard."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trl_ext.testing import build_tokenizer

    name = "llama-" + "-".join(str(shape[key]) for key in sorted(shape)) + f"-{dtype}"
    path = cache / name
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return str(path)
    tokenizer = build_tokenizer([" ".join(WORDS)], vocab_size=min(1000, shape["vocab_size"]))
    config = LlamaConfig(**shape, max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    staging = cache / f".{name}.staging"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del model
    staging.rename(path)  # complete or absent under its final name
    return str(path)


def block_rows(family: str, packing: bool, args) -> dict:
    """DPO: pairs cut at `seq_len` tokens. SFT packed: sequences of about `seq_len / SEQUENCES_PER_PACK` tokens (the
    tokenizer spells each benchmark word as one token), enough for `batches` batches of full rows. SFT unpacked: one
    sequence of `seq_len` tokens per row."""
    batch_size = args.sft_batch_size if family == "sft" else args.dpo_batch_size
    if family == "prefix":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        return token_shaped_rows(tokenizer, batch_size * args.batches, *TOKEN_SHAPES["stack_exchange"](args.seq_len))
    if not packing:
        return synthetic_rows(batch_size * args.batches, args.seq_len)
    # prompt words / 4 + completion words + 3 (EOS and a margin): SEQUENCES_PER_PACK fill a row without overflowing
    words = (args.seq_len // SEQUENCES_PER_PACK - 3) * 4 // 5
    rows = synthetic_rows(batch_size * args.batches * SEQUENCES_PER_PACK, words)
    return {"prompt": rows["prompt"], "completion": rows["chosen"]}


def qlora_trainer(block: str, contender: str, args):
    import torch
    from transformers import BitsAndBytesConfig

    family, packing, _ = BLOCKS[block]
    dtype = "bfloat16" if args.bf16 else "float32"
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=getattr(torch, dtype))
    return build_trainer(
        family, contender, args.model_dir, args.seq_len, "peft", args, rows=block_rows(family, packing, args),
        quantization_config=quantization, optim=args.optim, gradient_checkpointing_kwargs={"use_reentrant": False},
        model_init_kwargs={"dtype": dtype}, **({"packing": True} if packing else {}),  # DPOConfig has no `packing`
    )


def tokens_per_step(trainer) -> float:
    """Mean tokens (padding excluded) of the trainer's prepared batches."""
    counts = [float(batch["attention_mask"].sum()) if "attention_mask" in batch else float(batch["input_ids"].numel())
              for batch in trainer.get_train_dataloader()]
    return statistics.mean(counts)


def time_block(block: str, args) -> dict:
    """Worker: every contender of `block` built in this process and stepped side by side; a contender that fails to
    build or to step is recorded with its error and left out."""
    steps, measured = {}, {}
    for name in contenders_of(block, args):
        try:
            trainer = qlora_trainer(block, name, args)
            step = make_step(trainer)  # checks that gradient checkpointing is on
            step()  # fails here rather than halfway through the paired rounds (out of memory, say)
            steps[name], measured[name] = step, {"tokens_per_step": tokens_per_step(trainer)}
        except Exception as error:  # noqa: BLE001 (recorded, the other contenders go on)
            measured[name] = {"error": error_text(error)}
        free_memory()  # what a failed contender held, once its exception is gone
    baseline = contenders_of(block, args)[0]
    if baseline in steps:
        for name, row in side_by_side(steps, args.warmup, args.steps).items():
            measured[name].update(row, tokens_per_s=measured[name]["tokens_per_step"] / row["step_s"])
    elif steps:
        for name in steps:
            measured[name]["error"] = f"not compared: the baseline `{baseline}` failed"
    return measured


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def memory_of(block: str, contender: str, args) -> dict:
    """Worker: peak allocated and reserved CUDA memory of one contender in a fresh process, from after the model is
    loaded, over `memory_steps` steps."""
    import torch

    step = make_step(qlora_trainer(block, contender, args))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.memory_steps):
        step()
    return {"peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}


def worker_argv(args) -> list[str]:
    keys = ("cache", "seq_len", "warmup", "steps", "memory_steps", "batches", "dpo_batch_size", "sft_batch_size",
            "optim", "model_dir")
    flags = [f"--{flag}" for flag in ("bf16", "quick", "smoke") if getattr(args, flag)]
    return [f"--{key}={getattr(args, key)}" for key in keys] + flags


def memory_peaks(block: str, names: list[str], args):
    """Yields (contender, its peak memory or `memory_error`) in `names`' order, `memory_jobs` processes at once (peak
    allocated memory is per process, so processes side by side do not change it)."""
    def measure(name: str) -> dict:
        try:
            return run_worker(["--worker=memory", f"--block={block}", f"--contender={name}", *worker_argv(args)],
                              __file__)
        except Exception as error:  # noqa: BLE001
            return {"memory_error": error_text(error)}

    with ThreadPoolExecutor(args.memory_jobs) as pool:
        yield from zip(names, pool.map(measure, names))


def qlora_block(block: str, args, write) -> None:
    """One block: its side-by-side worker, then (CUDA) each contender's memory process; `write` gets each row once it
    is complete."""
    family, packing, _ = BLOCKS[block]
    names = contenders_of(block, args)
    try:
        measured = run_worker(["--worker=time", f"--block={block}", *worker_argv(args)], __file__)
    except Exception as error:  # noqa: BLE001 (the whole worker died: killed for memory, say)
        measured = {name: {"error": error_text(error)} for name in names}
    # A CPU process's RSS is `benchmarks/run.py`'s measure
    measurable = [name for name in names if "error" not in measured[name]] if cuda() else []
    peaks = dict(memory_peaks(block, measurable, args))
    baseline_peak = peaks.get(names[0], {}).get("peak_allocated_mib")
    for name in names:
        row = {"block": block, "family": family, "packing": packing, "contender": name, **measured[name],
               **peaks.get(name, {})}
        if "peak_allocated_mib" in row and baseline_peak:
            row["memory_ratio"] = row["peak_allocated_mib"] / baseline_peak
        row["targets"] = target_verdicts(row, on_cuda=cuda())
        write(row)


def target_verdicts(row: dict, on_cuda: bool) -> dict[str, str]:
    """The GPU targets that apply to `row`: `met`, `missed` or `not measured (why)`."""
    targets = {}
    if row["family"] == "dpo" and row["contender"] != "trl sigmoid":
        if row["contender"] == "dpop":
            targets["peak allocated < 12 GB"] = (
                "peak_allocated_mib", lambda value: value * 2**20 < DPO_MEMORY_LIMIT_BYTES)
        targets["memory within 1% of TRL"] = ("memory_ratio", lambda value: value <= 1.01)
        targets["step time within 2% of TRL"] = ("step_ratio", lambda value: value <= 1.02)
    if row["family"] == "prefix" and row["contender"] != "trl sigmoid":
        targets["at least 1.3x faster than TRL"] = ("step_ratio", lambda value: value <= 1 / 1.3)
        targets["step ratio within 5% of FLOP ratio"] = (
            "step_ratio", lambda value: abs(value / row["flop_ratio"] - 1) <= 0.05)
        targets["memory at most TRL's"] = ("memory_ratio", lambda value: value <= 1.0)
    if row["family"] == "sft" and row["contender"] != "trl nll":
        targets["step ratio within 3% of FLOP ratio"] = (
            "step_ratio", lambda value: abs(value / row["flop_ratio"] - 1) <= 0.03)
    verdicts = {}
    for name, (key, test) in targets.items():
        if not on_cuda:
            verdicts[name] = "not measured (no CUDA device)"
        elif key not in row:
            verdicts[name] = "not measured (failed)"
        else:
            verdicts[name] = "met" if test(row[key]) else "missed"
    return verdicts


def time_plan(args) -> dict[str, float]:
    """Planned seconds of each part on one H200, from `SECONDS_SEEN`. The 7B checkpoint is built while the pipeline
    runs (its own process), so it costs only what is left of it after the pipeline."""
    seen = SECONDS_SEEN
    plan = {}
    if "pipeline" in args.parts:
        plan["pipeline"] = LAUNCHES * seen["launch"]
    if "qlora" in args.parts:
        plan["checkpoint build"] = max(0.0, seen["build_7b"] - plan.get("pipeline", 0))
        for block in blocks(args):
            count, step = len(contenders_of(block, args)), seen["step"][BLOCKS[block][0]]
            build = seen["load_7b"] + seen["first_step"] + step  # load, first step, the counted step
            timing = seen["process"] + count * build + (args.warmup + args.steps) * count * step
            memory = math.ceil(count / args.memory_jobs) * (seen["process"] + build + args.memory_steps * step)
            plan[f"qlora {block}"] = timing + memory
    return plan


class ResultsLog:
    """`results.jsonl` in `output_dir`, one record a line, each written the moment it exists: the machine, every
    qlora and pipeline row, and each part's elapsed seconds against its plan."""

    def __init__(self, output_dir: Path):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "results.jsonl"
        self.path.write_text("")
        self.start = time.perf_counter()

    def write(self, kind: str, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"kind": kind, **record}) + "\n")

    @contextmanager
    def part(self, name: str, planned_s: float):
        start = time.perf_counter()
        print(f"[{start - self.start:6.0f} s] {name}: planned {planned_s:.0f} s", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.write("part", {"part": name, "planned_s": round(planned_s, 1), "elapsed_s": round(elapsed, 1)})
            print(f"[{time.perf_counter() - self.start:6.0f} s] {name}: took {elapsed:.0f} s (planned "
                  f"{planned_s:.0f} s)", file=sys.stderr, flush=True)


def read_results(output_dir: Path) -> dict:
    """The records of `results.jsonl`: `machine` (with the settings), `qlora`, `pipeline` and `parts` rows."""
    results = {"qlora": [], "pipeline": [], "parts": []}
    for line in (output_dir / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        kind = record.pop("kind")
        if kind == "machine":
            results["machine"] = record
        else:
            results[{"part": "parts"}.get(kind, kind)].append(record)
    return results


def markdown(results: dict) -> str:
    info = results["machine"]
    lines = [f"Device: {info['device']}, torch {info['torch']} (CUDA {info['cuda']}), transformers "
             f"{info['transformers']}, trl {info['trl']}, bitsandbytes {info['bitsandbytes']}, deepspeed "
             f"{info['deepspeed']}. {info['setting']}", ""]
    if results["qlora"]:
        lines += ["| block | contender | GFLOP/step | FLOP ratio | step s | step ratio | tokens/s | peak alloc MiB | "
                  "peak reserved MiB | memory ratio | targets |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in results["qlora"]:
            targets = "; ".join(f"{name}: {verdict}" for name, verdict in row["targets"].items())
            if "error" in row or "memory_error" in row:
                targets = f"FAILED: {row.get('error') or row['memory_error']}".replace("\n", " ").replace("|", "/")
            lines.append(
                f"| {row['block']} | {row['contender']} | {cell(row, 'flops', '.4g').replace('e+', 'e')} | "
                f"{cell(row, 'flop_ratio', '.3f')} | {cell(row, 'step_s', '.3f')} | {cell(row, 'step_ratio', '.3f')} | "
                f"{cell(row, 'tokens_per_s', '.0f')} | {cell(row, 'peak_allocated_mib', '.0f')} | "
                f"{cell(row, 'peak_reserved_mib', '.0f')} | "
                f"{cell(row, 'memory_ratio', '.3f')} | {targets} |")
        lines.append("")
    if results["pipeline"]:
        lines += ["| pipeline step | accelerate config | wall s | status |", "| --- | --- | --- | --- |"]
        lines += [f"| {row['step']} | {row['config']} | {cell(row, 'wall_s', '.0f')} | {row['status']} |"
                  for row in results["pipeline"]]
        lines.append("")
    lines += ["| part | planned s (one H200) | took s |", "| --- | --- | --- |"]
    lines += [f"| {row['part']} | {row['planned_s']:.0f} | {row['elapsed_s']:.0f} |" for row in results["parts"]]
    return "\n".join(lines) + "\n"


def check_requirements(args) -> None:
    """Fails before any work, naming what to install, when the suite cannot run what it was asked to."""
    missing = [package for package in ("trl", "datasets", "peft", "accelerate", "bitsandbytes")
               if importlib.util.find_spec(package) is None]
    if missing:
        raise SystemExit(f"benchmarks/gpu_suite.py needs {missing}: pip install {' '.join(missing)}")
    if not args.smoke and not cuda():
        raise SystemExit("benchmarks/gpu_suite.py needs a CUDA device (a 7B-shaped model, bf16, paged optimizers); "
                         "on a CPU run `python benchmarks/gpu_suite.py --smoke`.")


def run_info(args) -> dict:
    import bitsandbytes
    import torch

    deepspeed = importlib.util.find_spec("deepspeed")
    shape = SMOKE_SHAPE if args.smoke else LLAMA2_7B
    setting = (f"QLoRA: Llama shape {shape}, NF4 with {'bf16' if args.bf16 else 'float32'} compute, LoRA r 8 on "
               f"q/k/v/o, {args.dpo_batch_size} pairs / {args.sft_batch_size} rows x {args.seq_len} tokens, gradient "
               f"checkpointing, {args.optim}; step time: median of {args.steps} paired rounds after {args.warmup} "
               f"warm-up; memory: fresh process per contender, over {args.memory_steps} steps"
               f"{'; --quick' if args.quick else ''}.")
    return {**machine(), "bitsandbytes": bitsandbytes.__version__,
            "deepspeed": __import__("deepspeed").__version__ if deepspeed else "not installed",
            "cuda": torch.version.cuda, "setting": setting, "settings": vars(args)}


def main(args) -> dict:
    check_requirements(args)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    output_dir = Path(args.output_dir)
    log = ResultsLog(output_dir)
    log.write("machine", run_info(args))
    plan = time_plan(args)
    print("time plan (one H200): " + ", ".join(f"{part} {seconds:.0f} s" for part, seconds in plan.items())
          + f"; total {sum(plan.values()):.0f} s", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(1) as background:
        if "qlora" in args.parts:  # built in its own process while the pipeline runs
            dtype = "bfloat16" if args.bf16 else "float32"
            checkpoint = background.submit(run_worker, ["--worker=checkpoint", f"--cache={args.cache}",
                                                        f"--dtype={dtype}", *["--smoke"] * args.smoke], __file__)
        if "pipeline" in args.parts:
            with log.part("pipeline", plan["pipeline"]):
                pipeline_part(args.cache, lambda row: log.write("pipeline", row))
        if "qlora" in args.parts:
            qlora_part(args, checkpoint, plan, log)
    results = read_results(output_dir)
    table = markdown(results)
    (output_dir / "results.md").write_text(table)
    print(table)
    return results


def qlora_part(args, checkpoint, plan: dict, log: ResultsLog) -> None:
    """The random checkpoint (built in the background), then each block; a failed build fails every contender."""
    failure = None
    with log.part("checkpoint build", plan["checkpoint build"]):
        try:
            args.model_dir = checkpoint.result()
        except Exception as error:  # noqa: BLE001
            failure = f"no random checkpoint: {error_text(error)}"
    for block in blocks(args):
        with log.part(f"qlora {block}", plan[f"qlora {block}"]):
            if failure:
                for name in contenders_of(block, args):
                    log.write("qlora", {"block": block, "family": BLOCKS[block][0], "contender": name,
                                        "error": failure, "targets": {}})
            else:
                qlora_block(block, args, lambda row: log.write("qlora", row))


def failed(results: dict) -> bool:
    return (any("error" in row or "memory_error" in row for row in results["qlora"])
            or any(row["status"].startswith("failed") for row in results["pipeline"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["pipeline", "qlora"], choices=["pipeline", "qlora"])
    parser.add_argument("--quick", action="store_true",
                        help=f"fits {QUICK_BUDGET_S // 60} minutes on one H200: the pipeline, then the DPO block "
                             f"({', '.join(QUICK_BLOCKS['dpo'])}), the packed SFT block "
                             f"({', '.join(QUICK_BLOCKS['sft packed'])}) and the prefix-sharing block "
                             f"({', '.join(QUICK_BLOCKS['dpo prefix'])}); 1 warm-up + 8 timed rounds, 2 memory steps, "
                             "3 memory processes at once")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--dpo_batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--sft_batch_size", type=int, default=4, help="rows per step (packed rows in `sft packed`)")
    parser.add_argument("--batches", type=int, default=2, help="distinct batches per contender, cycled")
    parser.add_argument("--warmup", type=int, default=2, help="rounds not timed")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--memory_steps", type=int, default=3)
    parser.add_argument("--memory_jobs", type=int, default=1, help="memory processes at once on the one GPU")
    parser.add_argument("--optim", default="paged_adamw_32bit")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "trl_ext_gpu_suite"),
                        help="random checkpoints (the 7B one: 13.5 GB) and the pipeline's runs")
    parser.add_argument("--output_dir", default="benchmarks/results/gpu_suite")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU: tiny Llama shape, 2 pairs / rows x 128 tokens, float32, adamw_torch, 1 warm-up + 2 "
                             "timed rounds")
    parser.add_argument("--worker", choices=["time", "memory", "checkpoint"], help=argparse.SUPPRESS)
    parser.add_argument("--block", choices=list(BLOCKS), help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # set from the device
    args = parser.parse_args(argv)
    args.gradient_checkpointing = True
    if args.worker is None:
        args.bf16 = not args.smoke
        if args.quick:
            args.warmup, args.steps, args.memory_steps, args.memory_jobs = 1, 8, 2, 3
        if args.smoke:
            args.seq_len, args.warmup, args.steps, args.optim = 128, 1, 2, "adamw_torch"
            args.dpo_batch_size = args.sft_batch_size = 2
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.worker == "time":
        print(json.dumps(time_block(args.block, args)))
    elif args.worker == "memory":
        print(json.dumps(memory_of(args.block, args.contender, args)))
    elif args.worker == "checkpoint":
        print(json.dumps(random_checkpoint(SMOKE_SHAPE if args.smoke else LLAMA2_7B, Path(args.cache), args.dtype)))
    else:
        sys.exit(1 if failed(main(args)) else 0)
