"""Merges a LoRA adapter into a non-quantized copy of its base model and saves a standalone model with its tokenizer.

A QLoRA adapter is trained against 4-bit weights, but merging it into the 4-bit weights would round it away: the base
is loaded again in `--dtype` (bf16 in the Llama-2 pipeline) and the merged model loads with plain
`AutoModelForCausalLM.from_pretrained`.

```bash
python recipes/merge_adapter.py --adapter_dir outputs/llama2-sft --output_dir outputs/llama2-sft/merged
```
"""

# First: trl_ext drops the CPU-kernel notice bitsandbytes prints when peft (also through trl) imports it
import trl_ext  # noqa: F401

# isort: split

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

from trl_ext.cli import run_command
from trl_ext.scripts.common import CommandParser


@dataclass
class MergeArguments:
    adapter_dir: str = field(metadata={"help": "Directory of the trained adapter (and its tokenizer)."})
    output_dir: str = field(metadata={"help": "Where the merged model and tokenizer are saved."})
    dtype: str = field(default="bfloat16", metadata={"help": "dtype of the merged weights.",
                                                     "choices": ["bfloat16", "float16", "float32"]})


def merge_adapter(adapter_dir: str, output_dir: str, dtype: str = "bfloat16") -> str:
    """Loads the adapter's base in `dtype`, merges the adapter into it and saves the result to `output_dir`."""
    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"No `adapter_config.json` in `adapter_dir` {adapter_dir}: is it a PEFT adapter?")
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=getattr(torch, dtype), device_map=None)
    model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
    return output_dir


def main(merge_args: MergeArguments) -> str:
    output_dir = merge_adapter(merge_args.adapter_dir, merge_args.output_dir, merge_args.dtype)
    print(f"Merged model saved to {output_dir}.")
    return output_dir


def parse_args(argv: list[str] | None = None) -> tuple[MergeArguments]:
    """The arguments `main` takes, from `argv` (default: the command line): `python recipes/merge_adapter.py ARGV`."""
    return CommandParser((MergeArguments,)).parse_args_and_config(args=argv)


if __name__ == "__main__":
    sys.exit(run_command(main, parse_args, own_code=Path(__file__).parent))
