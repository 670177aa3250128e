"""Model and dataset names that look like local paths: checked on disk before anything loads, never sent to the hub.

`from_pretrained` and `datasets.load_dataset` treat a name that is not an existing path as a hub id, so a mistyped
local path fails after a hub round trip (or a 30 s timeout offline) with a message about repo ids. A hub id is
`name` or `namespace/name`, never starts with `.`, `/` or `~` and has no second `/`; a name that breaks one of these,
or whose parent directory exists, is a local path here.
"""

import os
from pathlib import Path

# What a model directory holds: a full model (`save_pretrained`) or a PEFT adapter
MODEL_DIRECTORY_FILES = ("config.json", "adapter_config.json")
# Suffixes of the data files `datasets` reads by extension
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".tsv")


def looks_local(name: str) -> bool:
    """Whether `name` can only be a local path, not a hub id (see the module's docstring)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    path = Path(name).expanduser()
    return path.exists() or "/" in name and path.parent.is_dir()


def _where(path: Path) -> str:
    absolute = path.expanduser().absolute()
    if path.expanduser().is_absolute():
        return str(absolute)
    return f"{absolute}, relative to the working directory {Path.cwd()}"


def check_model_path(name: str, field: str) -> None:
    """Raises a `ValueError` naming `field` (the flag or argument that gave `name`) if `name` looks like a local path
    but is not a model directory; hub ids and embedded names pass unchecked."""
    if not looks_local(name):
        return
    path = Path(name).expanduser()
    fix = ("Give the directory `save_pretrained` wrote (it holds config.json), a hub id such as "
           "`Qwen/Qwen2-0.5B-Instruct`, or `embedded:smollm2-135m-instruct`.")
    if not path.exists():
        raise ValueError(f"`{field}` is '{name}', which looks like a local path but does not exist ({_where(path)}). "
                         f"{fix}")
    if not path.is_dir():
        raise ValueError(f"`{field}` is '{name}', a file, not a model directory. {fix}")
    if not any((path / file).is_file() for file in MODEL_DIRECTORY_FILES):
        found = sorted(child.name for child in path.iterdir())
        listing = f"it holds {found[:8] + ['...'] if len(found) > 8 else found}" if found else "it is empty"
        raise ValueError(f"`{field}` is '{name}', a directory without a model: no config.json ({listing}). {fix}")


def check_dataset_path(name: str, field: str) -> None:
    """Raises a `ValueError` naming `field` if `name` looks like a local dataset path (a data-file suffix, or see
    [`looks_local`]) but does not exist, rather than let `datasets` look it up on the hub."""
    if not (name.endswith(DATA_FILE_SUFFIXES) or looks_local(name)):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(
            f"`{field}` is '{name}', which looks like a local path but does not exist ({_where(path)}); it is not "
            f"looked up on the hub. Give an existing file ({', '.join(DATA_FILE_SUFFIXES[:4])}) or directory, or a "
            "hub dataset name such as `trl-lib/ultrafeedback_binarized`."
        )
