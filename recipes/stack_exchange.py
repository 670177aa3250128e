"""What the two recipes of the Llama-2 pipeline (`llama2_sft.py`, `llama2_dpo.py`) share: the stack-exchange-paired data
(`question`, `response_j` better, `response_k` worse) and reading the arguments over a published config.

The hub dataset `lvwerra/stack-exchange-paired` keeps its splits in folders: `data/finetune` for SFT, `data/rl` for
DPO and `data/evaluation` for DPO's evaluation. `recipes/data/stack_exchange_sample` has the same layout, so a local
copy or the sample loads exactly like the hub dataset.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset

from trl_ext.paths import check_dataset_path
from trl_ext.scripts.common import CommandParser

HUB_DATASET = "lvwerra/stack-exchange-paired"
SAMPLE = str(Path(__file__).parent / "data" / "stack_exchange_sample")
COLUMNS = ("question", "response_j", "response_k")
CONFIGS = Path(__file__).parent / "configs"


@dataclass
class StackExchangeArguments:
    """The data both recipes read (each adds its split's `data_dir` and its own options)."""

    dataset_name: str = field(default=HUB_DATASET,
                              metadata={"help": "Hub dataset or local directory in the stack-exchange-paired layout."})


def parse_recipe_args(argument_types: tuple, argv: list[str] | None, config_name: str) -> tuple:
    """One instance of each of `argument_types` from `argv` (default: the command line) read over
    `configs/<config_name>` unless `argv` names a `--config`: the recipe runs its published setup with no arguments,
    and every flag still overrides the file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(arg.startswith("--config=") for arg in argv):
        argv = ["--config", str(CONFIGS / config_name), *argv]
    return CommandParser(argument_types).parse_args_and_config(args=argv)


def load_split(name_or_path: str, data_dir: str, streaming: bool = False):
    """The `train` split of `data_dir` in the hub dataset or a local directory with the same layout."""
    check_dataset_path(name_or_path, "dataset_name")
    dataset = load_dataset(name_or_path, data_dir=data_dir, split="train", streaming=streaming)
    missing = set(COLUMNS) - set(dataset.column_names or COLUMNS)
    if missing:
        raise ValueError(f"`{name_or_path}` ({data_dir}) needs columns {list(COLUMNS)}; {sorted(missing)} missing.")
    return dataset


def prompt_of(question: str) -> str:
    return f"Question: {question}\n\nAnswer: "


def sft_text(example: dict) -> dict:
    """The SFT sample: the question and its better answer as one text."""
    return {"text": prompt_of(example["question"]) + example["response_j"]}


def preference_pair(example: dict) -> dict:
    """The DPO sample: the better answer chosen, the worse one rejected."""
    return {"prompt": prompt_of(example["question"]), "chosen": example["response_j"],
            "rejected": example["response_k"]}
