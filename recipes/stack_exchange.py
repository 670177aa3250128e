"""The stack-exchange-paired data of the Llama-2 pipeline (`question`, `response_j` better, `response_k` worse).

The hub dataset `lvwerra/stack-exchange-paired` keeps its splits in folders: `data/finetune` for SFT, `data/rl` for
DPO and `data/evaluation` for DPO's evaluation. `recipes/data/stack_exchange_sample` has the same layout, so a local
copy or the sample loads exactly like the hub dataset.
"""

from pathlib import Path

from datasets import load_dataset

from trl_ext.paths import check_dataset_path

HUB_DATASET = "lvwerra/stack-exchange-paired"
SAMPLE = str(Path(__file__).parent / "data" / "stack_exchange_sample")
COLUMNS = ("question", "response_j", "response_k")


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
