"""Step time and peak memory of every trl_ext loss against its TRL baseline, as ratios measured in one run.

```bash
python benchmarks/run.py --smoke                                # tiny model, seq 128: under a minute
python benchmarks/run.py --models embedded --seq_lens 512       # the published target setting
python benchmarks/run.py                                        # tiny + embedded, seq 128 / 512 / 1024
python benchmarks/run.py --flops_only                           # FLOP counts only: minutes, not hours
```

For each configuration (family x model x sequence length x reference setup):
- **FLOPs**: of one training step (forward and backward), counted by `torch.utils.flop_counter` with formulas for
  what it leaves out (`flop_formulas`); deterministic, so a change that adds a forward shows in the ratio exactly,
  never hidden in timing noise;
- **step time**: one process builds every contender and steps them in alternation, rotating the order each round;
  the median optimizer-step time (forward, backward, optimizer step) after the warm-up rounds. Each trainer is first
  run through `Trainer.train` up to its first step, which turns gradient checkpointing on and prepares the model and
  optimizer as in a user's run;
- **peak memory**: one fresh process per contender; CPU: the process's peak RSS, GPU:
  `torch.cuda.max_memory_allocated`.
Ratios are against the TRL baseline of the same configuration (`trl sigmoid` for the DPO family, `trl nll` for
SFT): the step-time ratio is the median over rounds of the contender's time over the baseline's in the same round;
the `A/A` rows measure that baseline a second time, so their distance from 1 is the run's noise floor.
Writes `results.json` and `results.md` to `--output_dir` and prints the table.
"""

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

# (library, config overrides) per contender; the first of each family is the baseline. The "A/A" contender is the
# baseline built and measured a second time: its ratio is the noise floor of the run.
CONTENDERS = {
    "dpo": {
        "trl sigmoid": ("trl", {"loss_type": "sigmoid"}),
        "trl sigmoid A/A": ("trl", {"loss_type": "sigmoid"}),
        "trl_ext sigmoid": ("trl_ext", {"loss_type": "sigmoid"}),
        "dpop": ("trl_ext", {"loss_type": "dpop"}),
        "dpop_norm": ("trl_ext", {"loss_type": "dpop_norm"}),
        "cdpo": ("trl_ext", {"loss_type": "cdpo", "label_smoothing": 0.1}),
        "rdpo": ("trl_ext", {"loss_type": "rdpo"}),
        "beta_dpo": ("trl_ext", {"loss_type": "beta_dpo"}),
        "npo": ("trl_ext", {"loss_type": "npo"}),
        "tdpo1": ("trl_ext", {"loss_type": "tdpo1"}),
        "tdpo2": ("trl_ext", {"loss_type": "tdpo2"}),
        # A step between stage boundaries (the benchmark's steps never reach one)
        "sdpo": ("trl_ext", {"loss_type": "sigmoid", "sdpo_stages": 2}),
    },
    # Prefix sharing against TRL's two rows per pair, on rows shaped as users' (`ROWS`)
    "prefix": {
        "trl sigmoid": ("trl", {"loss_type": "sigmoid"}),
        "trl sigmoid A/A": ("trl", {"loss_type": "sigmoid"}),
        "sigmoid + prefix sharing": ("trl_ext", {"loss_type": "sigmoid", "prefix_sharing": True}),
        "dpop + prefix sharing": ("trl_ext", {"loss_type": "dpop", "prefix_sharing": True}),
    },
    "sft": {
        "trl nll": ("trl", {"loss_type": "nll"}),
        "trl nll A/A": ("trl", {"loss_type": "nll"}),
        "kl_sft": ("trl_ext", {"loss_type": "kl_sft"}),
        "kl_sft precomputed": ("trl_ext", {"loss_type": "kl_sft", "precompute_ref_log_probs": True}),
        "ift greedy": ("trl_ext", {"loss_type": "ift", "ift_prediction": "greedy"}),
        "ift soft": ("trl_ext", {"loss_type": "ift", "ift_prediction": "soft"}),
    },
}
# Setups a contender refuses: TDPO needs the reference's forward, which precomputed log-probs leave out
REFUSED_SETUPS = {"tdpo1": ("precomputed",), "tdpo2": ("precomputed",)}
# Reference setups: `peft` = LoRA, reference = adapter disabled; `ref_model` = full fine-tuning against a frozen
# copy; `precomputed` = LoRA with reference log-probs computed before training.
SETUPS = {"dpo": ("peft", "ref_model", "precomputed"), "prefix": ("peft", "precomputed"), "sft": ("peft",)}
# Targets at the embedded model, LoRA (`peft`), sequence length 512: (step-time ratio, peak-memory ratio).
TARGETS = {
    "trl_ext sigmoid": (1.01, 1.01),
    "dpop": (1.03, 1.02),
    "dpop_norm": (1.03, 1.02),
    "kl_sft": (1.45, 1.15),
    "kl_sft precomputed": (1.08, 1.05),
    "ift greedy": (1.45, 1.30),
    "ift soft": (1.60, 1.40),
}
WORDS = ("the students walked across campus toward the old library while the river ran quietly under bridges "
         "and autumn leaves covered every path near the museum").split()


def contenders(family: str, setup: str) -> list[str]:
    """The family's contenders that run in `setup`, the baseline first."""
    return [name for name in CONTENDERS[family] if setup not in REFUSED_SETUPS.get(name, ())]


def synthetic_rows(num_rows: int, seq_len: int) -> dict[str, list[str]]:
    """Prompts of about a quarter of `seq_len` words and completions longer than the rest (cut by `max_length`)."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(num_rows):
        rows["prompt"].append(words_from(i, seq_len // 4))
        rows["chosen"].append(" " + words_from(i + 3, seq_len))
        rows["rejected"].append(" " + words_from(i + 7, seq_len))
    return rows


def words_from(offset: int, num_words: int) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(num_words))


def token_shaped_rows(tokenizer, num_rows: int, prompt_tokens: int, completion_tokens: int) -> dict[str, list[str]]:
    """Preference rows whose prompt and two different completions are about `prompt_tokens` and `completion_tokens`
    tokens of `tokenizer` (texts cut at a token boundary); the two completions differ from their first word."""
    def tokens_from(offset: int, num_tokens: int) -> str:
        return tokenizer.decode(tokenizer(words_from(offset, num_tokens), add_special_tokens=False)["input_ids"]
                                [:num_tokens])

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(num_rows):
        rows["prompt"].append(tokens_from(i, prompt_tokens))
        rows["chosen"].append(" " + tokens_from(i + 3, completion_tokens))
        rows["rejected"].append(" " + tokens_from(i + 7, completion_tokens))
    return rows


# Row shapes users bring, by name: `(prompt tokens, completion tokens)` for a sequence length (`max_length`)
TOKEN_SHAPES = {
    # stack-exchange-paired as the Llama-2 recipe prepares it: prompts capped at half, answers of about a quarter
    "stack_exchange": lambda seq_len: (seq_len // 2, seq_len // 4),
    # the Penn experiment's: a sentence opener, a one-sentence continuation
    "penn": lambda seq_len: (12, 18),
}
# The row shapes each family is measured on
FAMILY_ROWS = {"dpo": ("synthetic",), "prefix": ("stack_exchange", "penn"), "sft": ("synthetic",)}


def model_path(model: str, cache: Path) -> str:
    """The checkpoint of a benchmark model name (`tiny`, `embedded`); any other value is a model directory."""
    if model == "embedded":
        return "embedded:smollm2-135m-instruct"
    if model != "tiny":
        return model
    from trl_ext.testing import build_tiny_llama

    path = cache / "tiny-llama"
    if not (path / "config.json").exists():
        build_tiny_llama(path, [" ".join(WORDS)])
    return str(path)


def build_trainer(family: str, contender: str, model: str, seq_len: int, setup: str, args, rows: dict | None = None,
                  quantization_config=None, shape: str = "synthetic", **config):
    """The contender's trainer on `rows` (default: rows of `shape` for `seq_len`), LoRA r 8 on q/k/v/o unless `setup`
    is `ref_model`; `config`: further config fields (`packing`, `optim`, ...)."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    import trl_ext

    library, overrides = CONTENDERS[family][contender]
    module = trl if library == "trl" else trl_ext
    preference = family != "sft"
    trainer_cls, config_cls = (
        (module.DPOTrainer, module.DPOConfig) if preference else (module.SFTTrainer, module.SFTConfig)
    )
    batch_size = args.dpo_batch_size if preference else args.sft_batch_size
    model_name = trl_ext.resolve_model_name(model_path(model, Path(args.cache)))
    if rows is None and shape == "synthetic":
        rows = synthetic_rows(batch_size * args.batches, seq_len)
    elif rows is None:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        rows = token_shaped_rows(tokenizer, batch_size * args.batches, *TOKEN_SHAPES[shape](seq_len))
    if family == "sft" and "chosen" in rows:
        rows = {"prompt": rows["prompt"], "completion": rows["chosen"]}
    config = config_cls(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch_size,
        max_length=seq_len,
        learning_rate=1e-5,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        **({"precompute_ref_log_probs": True} if setup == "precomputed" else {}),
        **config,
        **overrides,
    )
    peft_config = None
    if setup != "ref_model":
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return trainer_cls(
        model=model_name,
        args=config,
        train_dataset=Dataset.from_dict(rows),
        peft_config=peft_config,
        quantization_config=quantization_config,
    )


class _Prepared(Exception):
    """Raised from `on_train_begin`: `Trainer.train` has prepared the trainer for its first step."""


def prepare_as_train_does(trainer) -> None:
    """Runs `trainer.train()` up to its first step: gradient checkpointing turned on (transformers does it inside
    `train`, not `__init__`), the model and optimizer prepared by accelerate (autocast under bf16), as in a user's
    run."""
    from transformers import TrainerCallback

    class StopBeforeFirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise _Prepared

    stop = StopBeforeFirstStep()
    trainer.add_callback(stop)  # last: the trainer's own `on_train_begin` callbacks (sDPO's) run first
    try:
        trainer.train()
    except _Prepared:
        pass
    finally:
        trainer.remove_callback(stop)
    if trainer.args.gradient_checkpointing and not trainer.model.is_gradient_checkpointing:
        raise RuntimeError(f"{type(trainer).__name__}: `gradient_checkpointing=True`, but the model `train()` prepared "
                           "does not checkpoint: the benchmark would not measure the memory users get")


def make_step(trainer):
    """One optimizer step per call, cycling through the trainer's own prepared batches, on the model and optimizer
    `Trainer.train` prepares."""
    prepare_as_train_does(trainer)
    trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`'s epoch loop, which this loop replaces
    batches = list(trainer.get_train_dataloader())
    calls = iter(range(10**9))

    def step():
        trainer.training_step(trainer.model_wrapped, batches[next(calls) % len(batches)])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return step


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def four_bit_matmul_flops(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
    """`bitsandbytes::gemm_4bit` and `::gemv_4bit` (every overload): `A (..., K)` times the transpose of a 4-bit
    weight of shape `shape_b` `(N, K)`, as `aten.mm` counts it."""
    n, k = shape_b
    return 2 * math.prod(a_shape[:-1]) * n * k


def addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """`aten.addmm` in every overload, and in place. Torch's own formula takes the positional `out_dtype` of
    `addmm.dtype_out` for its `out_shape` and fails; `addmm_` it does not count."""
    from torch.utils.flop_counter import mm_flop

    return mm_flop(a_shape, b_shape)


def with_query_heads(query_shape, *shapes) -> list[tuple]:
    """`(B, H, S, D)` key and value shapes given the query's head count: grouped-query attention multiplies each
    query head by its shared key and value heads (torch before 2.10 asserts equal counts)."""
    return [(shape[0], query_shape[1], *shape[2:]) for shape in shapes]


def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, *with_query_heads(query_shape, key_shape, value_shape))


def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape,
                                    *with_query_heads(query_shape, key_shape, value_shape))


def flop_formulas() -> dict:
    """Formulas for the products a training step runs that `torch.utils.flop_counter` leaves out or fails on:
    - bitsandbytes' 4-bit products: from 0.50 `gemm_4bit` computes every forward of a 4-bit layer (policy, reference
      and checkpointing's recompute) on any device, and from 0.47 `gemv_4bit` the CPU's AVX512-BF16 kernel without
      gradient; their kernels run below the counter. Earlier releases dequantize and multiply with aten's products,
      which torch counts, as it counts the backward's dequantized `aten.mm`;
    - `aten.addmm`: TRL's chunked log-prob kernel accumulates the LM head's gradient products with
      `addmm(out_dtype=float32)` on CUDA in bf16/fp16 and with `addmm_` elsewhere;
    - the CPU's fused attention, forward and backward, by torch's formulas for the CUDA kernels (without them a CPU
      counts no attention)."""
    import bitsandbytes  # noqa: F401  (defines torch.ops.bitsandbytes)
    import torch

    aten, four_bit = torch.ops.aten, torch.ops.bitsandbytes
    return {
        **{getattr(four_bit, name): four_bit_matmul_flops for name in ("gemm_4bit", "gemv_4bit")
           if hasattr(four_bit, name)},
        aten.addmm: addmm_flops,
        aten.addmm_: addmm_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
    }


def step_flops(step) -> int:
    """FLOPs of one call of `step`: matrix products and attention, counted by `torch.utils.flop_counter` with
    `flop_formulas()` for those it leaves out."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        step()
    return counter.get_total_flops()


def flop_ratios(steps: Iterable[tuple[str, Callable]]) -> dict[str, dict]:
    """Each contender's FLOPs for one step on the same batch, and their ratio to the first (the baseline)'s.
    `steps` yields `(name, step)` pairs; a generator lets each contender be freed before the next is built."""
    flops = {name: step_flops(step) for name, step in steps}
    baseline = flops[next(iter(flops))]
    return {name: {"flops": value, "flop_ratio": value / baseline} for name, value in flops.items()}


def contender_steps(family, model, seq_len, setup, args) -> dict:
    return {name: make_step(build_trainer(family, name, model, seq_len, setup, args, shape=args.shape))
            for name in contenders(family, setup)}


def flops_worker(family, model, seq_len, setup, args) -> dict:
    # One contender in memory at a time: the `ref_model` setup holds a model, its reference and Adam state each
    return flop_ratios((name, make_step(build_trainer(family, name, model, seq_len, setup, args, shape=args.shape)))
                       for name in contenders(family, setup))


def time_worker(family, model, seq_len, setup, args) -> dict:
    return side_by_side(contender_steps(family, model, seq_len, setup, args), args.warmup, args.steps)


def side_by_side(steps: dict[str, Callable], warmup: int, rounds: int) -> dict:
    """Per contender (the first is the baseline): the FLOPs of a step, the median step time, and the median over
    rounds of its step time divided by the baseline's in the same round. The paired ratio cancels what drifts between
    rounds (other load, clock changes)."""
    flops = flop_ratios(steps.items())  # first, so every contender counts the same batch
    names = list(steps)
    times = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            synchronize()
            start = time.perf_counter()
            steps[name]()
            synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    baseline = times[names[0]]
    return {name: {**flops[name], "step_s": statistics.median(values),
                   "step_ratio": statistics.median(t / b for t, b in zip(values, baseline)),
                   "round_s": values}
            for name, values in times.items()}


def memory_worker(family, contender, model, seq_len, setup, args) -> float:
    import torch

    step = make_step(build_trainer(family, contender, model, seq_len, setup, args, shape=args.shape))
    for _ in range(args.memory_steps):
        step()
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_worker(argv: list[str], script: str = __file__) -> object:
    """Runs `script` with `argv` in a fresh process; returns the JSON of its last line of output."""
    command = [sys.executable, script, *argv]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch
    import transformers
    import trl

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        device = names[0] if names else platform.processor() or "CPU"
    return {
        "device": device,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def cell(row: dict, key: str, spec: str) -> str:
    """`row[key]` formatted, or `-` where the row has no such measure (`--flops_only`, a failed contender)."""
    return format(row[key], spec) if key in row else "-"


def markdown(results: list[dict], info: dict, args) -> str:
    measured = ("FLOPs of one step only (`--flops_only`)." if args.flops_only else
                f"step time: median of {args.steps} steps after {args.warmup} warm-up; peak memory: over "
                f"{args.memory_steps} steps.")
    lines = [
        f"Device: {info['device']} ({info['cpu_count']} CPUs), torch {info['torch']}, transformers "
        f"{info['transformers']}, trl {info['trl']}. Batch: {args.dpo_batch_size} pairs (DPO), {args.sft_batch_size} "
        f"sequences (SFT); gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; {measured}",
        "",
        "| family | model | seq | rows | setup | contender | GFLOP/step | FLOP ratio | step s | step ratio | "
        "peak MiB | memory ratio | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results:
        lines.append(
            f"| {row['family']} | {row['model']} | {row['seq_len']} | {row['rows']} | {row['setup']} | "
            f"{row['contender']} | "
            f"{row['flops'] / 1e9:.2f} | {row['flop_ratio']:.3f} | {cell(row, 'step_s', '.3f')} | "
            f"{cell(row, 'step_ratio', '.3f')} | {cell(row, 'peak_mib', '.0f')} | {cell(row, 'memory_ratio', '.3f')} | "
            f"{row['target']} |"
        )
    return "\n".join(lines) + "\n"


def target_verdict(row: dict) -> str:
    target = TARGETS.get(row["contender"])
    published = (row["model"], row["seq_len"], row["setup"]) == ("embedded", 512, "peft")
    if target is None or "step_ratio" not in row or not published:
        return ""
    met = row["step_ratio"] <= target[0] and row["memory_ratio"] <= target[1]
    return f"{'met' if met else 'missed'} (<= {target[0]}, <= {target[1]})"


def main(args) -> list[dict]:
    common = [f"--{key}={value}" for key, value in vars(args).items()
              if key in ("cache", "warmup", "steps", "memory_steps", "batches", "dpo_batch_size", "sft_batch_size")]
    common += ["--gradient_checkpointing"] * args.gradient_checkpointing + ["--bf16"] * args.bf16
    results, info = [], machine()
    for family in args.families:
        for model, seq_len, shape, setup in product(args.models, args.seq_lens, FAMILY_ROWS[family], SETUPS[family]):
            if setup not in args.setups:
                continue
            where = [f"--family={family}", f"--model={model}", f"--seq_len={seq_len}", f"--setup={setup}",
                     f"--shape={shape}"]
            print(f"measuring {family} {model} seq {seq_len} {shape} {setup}", file=sys.stderr, flush=True)
            if args.flops_only:
                measured = run_worker(["--worker=flops", *where, *common])
            else:
                measured = run_worker(["--worker=time", *where, *common])
                with ThreadPoolExecutor(args.memory_jobs) as pool:
                    peaks = dict(zip(contenders(family, setup), pool.map(
                        lambda name: run_worker(["--worker=memory", f"--contender={name}", *where, *common]),
                        contenders(family, setup),
                    )))
                baseline = contenders(family, setup)[0]
                for name in contenders(family, setup):
                    measured[name].update(peak_mib=peaks[name], memory_ratio=peaks[name] / peaks[baseline])
            for name in contenders(family, setup):
                row = {"family": family, "model": model, "seq_len": seq_len, "rows": shape, "setup": setup,
                       "contender": name, **measured[name]}
                row["target"] = target_verdict(row)
                results.append(row)
            write_results(results, info, args)  # after every configuration: an interrupted run keeps them
    print(write_results(results, info, args))
    return results


def write_results(results: list[dict], info: dict, args) -> str:
    """Writes `results.json` and `results.md` to `args.output_dir`; returns the table."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(results, info, args)
    (output_dir / "results.md").write_text(table)
    (output_dir / "results.json").write_text(json.dumps(
        {"machine": info, "settings": vars(args), "results": results}, indent=2
    ))
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--models", nargs="+", default=["tiny", "embedded"], choices=["tiny", "embedded"])
    parser.add_argument("--seq_lens", nargs="+", type=int, default=[128, 512, 1024])
    parser.add_argument("--setups", nargs="+", default=["peft", "ref_model", "precomputed"],
                        choices=["peft", "ref_model", "precomputed"])
    parser.add_argument("--warmup", type=int, default=2, help="rounds not timed")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds")
    parser.add_argument("--memory_steps", type=int, default=3,
                        help="steps of each memory process: the peak is reached once the optimizer state exists")
    parser.add_argument("--batches", type=int, default=2, help="distinct batches per contender, cycled")
    parser.add_argument("--dpo_batch_size", type=int, default=2)
    parser.add_argument("--sft_batch_size", type=int, default=4)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--memory_jobs", type=int, default=2, help="memory processes at once (RSS is per process)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "trl_ext_benchmarks"))
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny model, seq 128, LoRA only, few steps")
    parser.add_argument("--flops_only", action="store_true",
                        help="count the FLOPs of one step per contender; no timing, no memory (minutes, not hours)")
    parser.add_argument("--worker", choices=["flops", "time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--seq_len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="synthetic", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.seq_lens, args.setups = ["tiny"], [128], ["peft"]
        args.warmup, args.steps, args.memory_steps = 1, 2, 2
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.worker == "flops":
        print(json.dumps(flops_worker(args.family, args.model, args.seq_len, args.setup, args)))
    elif args.worker == "time":
        print(json.dumps(time_worker(args.family, args.model, args.seq_len, args.setup, args)))
    elif args.worker == "memory":
        print(json.dumps(memory_worker(args.family, args.contender, args.model, args.seq_len, args.setup, args)))
    else:
        main(args)
