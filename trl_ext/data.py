"""Dataset loading shared by the recipes: a local JSON/JSONL file or directory, or a hub dataset."""

from pathlib import Path

from datasets import DatasetDict, IterableDatasetDict, load_dataset

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset_any(
    name_or_path: str, config_name: str | None = None, streaming: bool = False
) -> DatasetDict | IterableDatasetDict:
    """Loads `name_or_path` as a dict of splits.

    A local `.json` (a list of objects, or one object per line), `.jsonl`, `.csv` or `.parquet` file becomes a single
    `train` split; a local directory or a hub name goes to `datasets.load_dataset` unchanged.
    """
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(
                f"Cannot read dataset file {path}: expected one of {sorted(LOCAL_SUFFIXES)}, got `{path.suffix}`."
            )
        return load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), streaming=streaming)
    return load_dataset(name_or_path, name=config_name, streaming=streaming)
