"""The GPU suite's pipeline part: the Llama-2 recipes on a small random Llama through `accelerate launch` with the
single-GPU, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP configs (`benchmarks/gpu_suite.py` runs it; `--parts pipeline`)."""

import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The Llama-2 recipes' shipped data, in the hub dataset's layout: data/<split>/train.jsonl of question/response rows
STACK_EXCHANGE_SAMPLE = ROOT / "recipes" / "data" / "stack_exchange_sample"
CONFIGS = ("single_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp")
SHARDED_QLORA_FLAGS = ["--bnb_4bit_quant_storage", "bfloat16"]  # ZeRO-3 and FSDP shard the packed 4-bit weights
LAUNCHES = 1 + len(CONFIGS)  # SFT + merge, then DPOP under each config
LOG_TAIL_CHARS = 3000  # of a failed launch's log, kept in its row: the log itself stays on the machine that ran it


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(error)).strip()[-2000:]


def pipeline_model(cache: Path) -> str:
    """A small random Llama whose tokenizer is trained on the stack-exchange sample, saved under `cache` once."""
    from trl_ext.testing import build_tiny_llama

    path = cache / "se-llama"
    if not (path / "config.json").exists():
        files = [STACK_EXCHANGE_SAMPLE / "data" / split / "train.jsonl" for split in ("finetune", "rl", "evaluation")]
        corpus = [row[key] for file in files for row in map(json.loads, file.read_text().splitlines())
                  for key in ("question", "response_j", "response_k")]
        build_tiny_llama(path, corpus, hidden_size=128, vocab_size=1000)
    return str(path)


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


def pipeline_steps(work: Path, cache: Path) -> list[tuple[str, str, str, list[str], tuple[str, ...]]]:
    """(name, accelerate config, recipe, its arguments, metrics it must log): SFT + merge, then DPOP on the merged
    model under each config."""
    sft_dir = work / "sft"
    steps = [("sft + merge", "single_gpu", "llama2_sft.py",
              ["--model_name_or_path", pipeline_model(cache), "--output_dir", str(sft_dir)], ())]
    for config in CONFIGS:
        dpop = ["--model_name_or_path", str(sft_dir / "merged"), "--loss_type", "dpop", "--eval_strategy", "no",
                "--output_dir", str(work / f"dpop-{config}"),
                *(SHARDED_QLORA_FLAGS if config in ("deepspeed_zero3", "fsdp") else [])]
        steps.append((f"dpop ({config})", config, "llama2_dpo.py", dpop, ("dpop/penalty", "dpop/active")))
    return steps


def pipeline_part(cache: str, write: Callable[[dict], None]) -> None:
    """SFT + merge, DPOP, then DPOP under each distributed config; `write` gets each step's row once it is done."""
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_pipeline_", dir=cache))
    common = ["--dataset_name", str(STACK_EXCHANGE_SAMPLE), "--max_steps", "3",
              "--save_steps", "3", "--logging_steps", "1", "--warmup_steps", "0", "--report_to", "none",
              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "256",
              "--seed", "0"]
    if not cuda():  # the recipes' YAML: bf16 and paged AdamW, for a GPU
        common += ["--bf16", "false", "--dtype", "float32", "--optim", "adamw_torch"]
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    for name, config, script, script_args, metrics in pipeline_steps(work, Path(cache)):
        row = {"step": name, "config": f"accelerate_configs/{config}.yaml"}
        print(f"pipeline: {name}", file=sys.stderr, flush=True)
        if not cuda() and config != "single_gpu":
            write({**row, "status": "skipped: needs CUDA"})
            continue
        if config.startswith("deepspeed") and not deepspeed:
            print(f"WARNING: {name} skipped: deepspeed is not installed (pip install deepspeed)", file=sys.stderr)
            write({**row, "status": "skipped: deepspeed not installed (pip install deepspeed)"})
            continue
        if not cuda():
            row["config"] = "accelerate launch --cpu (no CUDA device)"
        output_dir = Path(script_args[script_args.index("--output_dir") + 1])
        log = work / f"{output_dir.name}.log"
        start = time.perf_counter()
        result = launch(config if cuda() else None, script, [*common, *script_args], log)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        problem = f"exit status {result.returncode}; log: {log}" if result.returncode else None
        if problem is None and script == "llama2_sft.py" and not (work / "sft" / "merged" / "config.json").exists():
            problem = f"no merged model in {work / 'sft' / 'merged'}"
        if problem is None:
            try:
                problem = check_run(output_dir, metrics)
            except Exception as error:  # noqa: BLE001
                problem = error_text(error)
        row["status"] = "passed" if problem is None else f"failed: {problem}"
        if problem is not None:
            row["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        write(row)
