"""The costs users meet on a GPU, in one command: QLoRA on a Llama-2-7B-shaped model, and the Llama-2 pipeline through
accelerate's single-GPU, DeepSpeed and FSDP configs. Nothing is downloaded: models are built from configs with random
weights, data are synthetic or the shipped stack-exchange sample.

```bash
python benchmarks/gpu_suite.py                          # a CUDA machine: the whole suite, about an hour
python benchmarks/gpu_suite.py --parts qlora            # only the 7B-shaped QLoRA benchmark (or: --parts pipeline)
python benchmarks/gpu_suite.py --smoke                  # CPU: a tiny Llama shape through the same code, minutes
```

- **qlora**: a Llama-2-7B-shaped model (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000), random
  bf16 weights saved once under `--cache` and loaded in 4-bit NF4 with bf16 compute; LoRA r 8 on q/k/v/o, gradient
  checkpointing, paged AdamW (32-bit). Three blocks, each against its TRL baseline: the DPO family on 4 pairs x 1024
  tokens; the SFT family with packing, 4 rows x 1024 tokens of about 250-token sequences; and `kl_sft` with
  precomputed reference log-probs (which refuses packing) against `nll` on 4 unpacked 1024-token rows. One process per
  block steps every contender side by side (`benchmarks/run.py`'s paired rounds, FLOPs counted first); peak memory
  comes from one fresh process per contender: `torch.cuda.max_memory_allocated` and `max_memory_reserved` after the
  model is loaded and over `--memory_steps` steps (in the side-by-side process every other contender's model is
  resident too; CUDA only: on a CPU `benchmarks/run.py` measures each process's RSS).
- **pipeline**: `recipes/llama2_sft.py` (QLoRA SFT, then the merge) and `recipes/llama2_dpo.py --loss_type dpop`
  through `accelerate launch --config_file accelerate_configs/single_gpu.yaml` on a small random Llama saved
  locally and `recipes/data/stack_exchange_sample`; then the DPOP step through `deepspeed_zero2.yaml`,
  `deepspeed_zero3.yaml` and `fsdp.yaml` with one process each. Each step passes when it exits 0, every logged loss is
  finite, DPOP's `dpop/*` metrics are logged, and the saved adapter loads back and computes finite logits.
- **targets**, per row: met, missed or not measured (CPU, a failed contender): QLoRA DPOP peak allocated under 12 GB;
  every DPO-family contender within 1% of TRL's peak allocated memory and 2% of its step time; every SFT-family step
  time within 3% of its FLOP ratio.

A contender or step that fails is recorded with its error and the suite goes on; the exit status is 1 if anything
failed. `--smoke` runs on a CPU what a CPU can: the same blocks at a tiny shape in float32 (AdamW in torch, no memory
processes), the pipeline through `accelerate launch --cpu`, the DeepSpeed and FSDP steps recorded as skipped. Writes
`results.json` and `results.md` to `--output_dir` and prints the tables.
"""

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402: benchmarks/ is not a package
    CONTENDERS, WORDS, build_trainer, machine, make_step, run_worker, side_by_side, synthetic_rows,
)

ROOT = Path(__file__).resolve().parents[1]
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
}
SEQUENCES_PER_PACK = 4
DPO_MEMORY_LIMIT_BYTES = 12e9  # QLoRA DPOP at 4 x 1024 tokens with checkpointing
PIPELINE_CONFIGS = ("single_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp")
SHARDED_QLORA_FLAGS = ["--bnb_4bit_quant_storage", "bfloat16"]  # ZeRO-3 and FSDP shard the packed 4-bit weights


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    batch_size = args.dpo_batch_size if family == "dpo" else args.sft_batch_size
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


def error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(error)).strip()[-2000:]


def time_block(block: str, args) -> dict:
    """Worker: every contender of `block` built in this process and stepped side by side; a contender that fails to
    build or to step is recorded with its error and left out."""
    steps, measured = {}, {}
    for name in BLOCKS[block][2]:
        try:
            trainer = qlora_trainer(block, name, args)
            step = make_step(trainer)
            step()  # fails here rather than halfway through the paired rounds (out of memory, say)
            steps[name], measured[name] = step, {"tokens_per_step": tokens_per_step(trainer)}
        except Exception as error:  # noqa: BLE001: recorded, the other contenders go on
            measured[name] = {"error": error_text(error)}
        free_memory()  # what a failed contender held, once its exception is gone
    baseline = BLOCKS[block][2][0]
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
    return [f"--{key}={getattr(args, key)}" for key in keys] + ["--bf16"] * args.bf16


def qlora_part(args) -> list[dict]:
    dtype = "bfloat16" if args.bf16 else "float32"
    args.model_dir = random_checkpoint(SMOKE_SHAPE if args.smoke else LLAMA2_7B, Path(args.cache), dtype)
    common = worker_argv(args)
    rows = []
    for block, (family, packing, contenders) in BLOCKS.items():
        print(f"qlora: {block}", file=sys.stderr, flush=True)
        try:
            measured = run_worker(["--worker=time", f"--block={block}", *common], __file__)
        except Exception as error:  # noqa: BLE001: the whole worker died (killed for memory, say)
            measured = {name: {"error": error_text(error)} for name in contenders}
        for name in contenders:
            row = {"block": block, "family": family, "packing": packing, "contender": name, **measured[name]}
            if "error" not in row and cuda():  # a CPU process's RSS is `benchmarks/run.py`'s measure
                try:
                    row.update(run_worker(["--worker=memory", f"--block={block}", f"--contender={name}", *common],
                                          __file__))
                except Exception as error:  # noqa: BLE001
                    row["memory_error"] = error_text(error)
            rows.append(row)
    for block in BLOCKS:
        block_rows_ = [row for row in rows if row["block"] == block]
        baseline = block_rows_[0]
        for row in block_rows_:
            if "peak_allocated_mib" in row and "peak_allocated_mib" in baseline:
                row["memory_ratio"] = row["peak_allocated_mib"] / baseline["peak_allocated_mib"]
    for row in rows:
        row["targets"] = target_verdicts(row, on_cuda=cuda())
    return rows


def target_verdicts(row: dict, on_cuda: bool) -> dict[str, str]:
    """The GPU targets that apply to `row`: `met`, `missed` or `not measured (why)`."""
    targets = {}
    if row["family"] == "dpo" and row["contender"] != "trl sigmoid":
        if row["contender"] == "dpop":
            targets["peak allocated < 12 GB"] = (
                "peak_allocated_mib", lambda value: value * 2**20 < DPO_MEMORY_LIMIT_BYTES)
        targets["memory within 1% of TRL"] = ("memory_ratio", lambda value: value <= 1.01)
        targets["step time within 2% of TRL"] = ("step_ratio", lambda value: value <= 1.02)
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


def pipeline_model(cache: Path) -> str:
    """A small random Llama whose tokenizer is trained on the stack-exchange sample, saved under `cache` once."""
    from trl_ext.testing import build_tiny_llama

    stack_exchange = recipes_module("stack_exchange")
    path = cache / "se-llama"
    if not (path / "config.json").exists():
        corpus = [row[key] for split in ("finetune", "rl", "evaluation")
                  for row in stack_exchange.load_split(stack_exchange.SAMPLE, f"data/{split}")
                  for key in stack_exchange.COLUMNS]
        build_tiny_llama(path, corpus, hidden_size=128, vocab_size=1000)
    return str(path)


def recipes_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(config: str | None, script: str, script_args: list[str], log: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` of a recipe with one process: with `accelerate_configs/<config>.yaml`, or `--cpu`."""
    launcher = (["--config_file", str(ROOT / "accelerate_configs" / f"{config}.yaml"), "--num_processes", "1"]
                if config else ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no"])
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(ROOT / "recipes" / script),
               *script_args]
    with log.open("w") as output:
        return subprocess.run(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)


def check_run(output_dir: Path, metrics: tuple[str, ...]) -> str | None:
    """None if the run's last checkpoint logged finite losses and `metrics`, and its saved adapter loads back and
    computes finite logits; else what is wrong."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    if not checkpoints:
        return f"no checkpoint in {output_dir}"
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        return f"logged losses {losses}: none, or not finite"
    missing = [key for key in metrics if not any(key in entry for entry in history)]
    if missing:
        return f"not logged: {missing}"
    model = AutoPeftModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32, device_map=None)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    with torch.no_grad():
        logits = model(**tokenizer("Question: How do I reverse a list?\n\nAnswer:", return_tensors="pt")).logits
    return None if torch.isfinite(logits).all() else "the adapter loaded back computes non-finite logits"


def pipeline_part(args) -> list[dict]:
    """SFT + merge, DPOP, then DPOP under each distributed config; one row per step."""
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_pipeline_", dir=args.cache))
    common = ["--dataset_name", str(ROOT / "recipes/data/stack_exchange_sample"), "--max_steps", "3",
              "--save_steps", "3", "--logging_steps", "1", "--warmup_steps", "0", "--report_to", "none",
              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "256",
              "--seed", "0"]
    if not cuda():  # the recipes' YAML: bf16 and paged AdamW, for a GPU
        common += ["--bf16", "false", "--dtype", "float32", "--optim", "adamw_torch"]
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    sft_dir = work / "sft"
    steps = [("sft + merge", "single_gpu", "llama2_sft.py",
              ["--model_name_or_path", pipeline_model(Path(args.cache)), "--output_dir", str(sft_dir)], ())]
    for config in PIPELINE_CONFIGS:
        dpop = ["--model_name_or_path", str(sft_dir / "merged"), "--loss_type", "dpop", "--eval_strategy", "no",
                "--output_dir", str(work / f"dpop-{config}"), *(SHARDED_QLORA_FLAGS if config in (
                    "deepspeed_zero3", "fsdp") else [])]
        steps.append((f"dpop ({config})", config, "llama2_dpo.py", dpop, ("dpop/penalty", "dpop/active")))
    rows = []
    for name, config, script, script_args, metrics in steps:
        row = {"step": name, "config": f"accelerate_configs/{config}.yaml"}
        print(f"pipeline: {name}", file=sys.stderr, flush=True)
        if not cuda() and config != "single_gpu":
            rows.append({**row, "status": "skipped: needs CUDA"})
            continue
        if config.startswith("deepspeed") and not deepspeed:
            print(f"WARNING: {name} skipped: deepspeed is not installed (pip install deepspeed)", file=sys.stderr)
            rows.append({**row, "status": "skipped: deepspeed not installed (pip install deepspeed)"})
            continue
        if not cuda():
            row["config"] = "accelerate launch --cpu (no CUDA device)"
        output_dir = Path(script_args[script_args.index("--output_dir") + 1])
        log = work / f"{output_dir.name}.log"
        start = time.perf_counter()
        result = launch(config if cuda() else None, script, [*common, *script_args], log)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        problem = f"exit status {result.returncode}; log: {log}" if result.returncode else None
        if problem is None and script == "llama2_sft.py" and not (sft_dir / "merged" / "config.json").exists():
            problem = f"no merged model in {sft_dir / 'merged'}"
        if problem is None:
            try:
                problem = check_run(output_dir, metrics)
            except Exception as error:  # noqa: BLE001
                problem = error_text(error)
        row["status"] = "passed" if problem is None else f"failed: {problem}"
        rows.append(row)
    return rows


def cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def markdown(results: dict) -> str:
    info = results["machine"]
    lines = [f"Device: {info['device']}, torch {info['torch']} (CUDA {info['cuda']}), transformers "
             f"{info['transformers']}, trl {info['trl']}, bitsandbytes {info['bitsandbytes']}, deepspeed {info['deepspeed']}. {results['setting']}", ""]
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


def main(args) -> dict:
    import bitsandbytes
    import torch

    check_requirements(args)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    deepspeed = importlib.util.find_spec("deepspeed")
    info = {**machine(), "bitsandbytes": bitsandbytes.__version__,
            "deepspeed": __import__("deepspeed").__version__ if deepspeed else "not installed",
            "cuda": torch.version.cuda}
    shape = SMOKE_SHAPE if args.smoke else LLAMA2_7B
    setting = (f"QLoRA: Llama shape {shape}, NF4 with {'bf16' if args.bf16 else 'float32'} compute, LoRA r 8 on "
               f"q/k/v/o, {args.dpo_batch_size} pairs / {args.sft_batch_size} rows x {args.seq_len} tokens, gradient "
               f"checkpointing, {args.optim}; step time: median of {args.steps} paired rounds after {args.warmup} "
               f"warm-up; memory: fresh process per contender, over {args.memory_steps} steps.")
    results = {"machine": info, "settings": vars(args), "setting": setting,
               "qlora": qlora_part(args) if "qlora" in args.parts else [],
               "pipeline": pipeline_part(args) if "pipeline" in args.parts else []}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (output_dir / "results.md").write_text(table)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(table)
    return results


def failed(results: dict) -> bool:
    return (any("error" in row or "memory_error" in row for row in results["qlora"])
            or any(row["status"].startswith("failed") for row in results["pipeline"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["qlora", "pipeline"], choices=["qlora", "pipeline"])
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--dpo_batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--sft_batch_size", type=int, default=4, help="rows per step (packed rows in `sft packed`)")
    parser.add_argument("--batches", type=int, default=2, help="distinct batches per contender, cycled")
    parser.add_argument("--warmup", type=int, default=2, help="rounds not timed")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--memory_steps", type=int, default=3)
    parser.add_argument("--optim", default="paged_adamw_32bit")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "trl_ext_gpu_suite"),
                        help="random checkpoints (the 7B one: 13.5 GB) and the pipeline's runs")
    parser.add_argument("--output_dir", default="benchmarks/results/gpu_suite")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU: tiny Llama shape, 2 pairs / rows x 128 tokens, float32, adamw_torch, 1 warm-up + 2 "
                             "timed rounds")
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--block", choices=list(BLOCKS), help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # set from the device
    args = parser.parse_args(argv)
    args.gradient_checkpointing = True
    if args.worker is None:
        args.bf16 = not args.smoke
    if args.smoke and args.worker is None:
        args.seq_len, args.warmup, args.steps, args.optim = 128, 1, 2, "adamw_torch"
        args.dpo_batch_size = args.sft_batch_size = 2
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.worker == "time":
        print(json.dumps(time_block(args.block, args)))
    elif args.worker == "memory":
        print(json.dumps(memory_of(args.block, args.contender, args)))
    else:
        sys.exit(1 if failed(main(args)) else 0)
