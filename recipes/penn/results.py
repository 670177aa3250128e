"""Each Penn-experiment result records what produced it, and a rerun reuses it only on an exact match.

A method's provenance is its settings (every experiment and model argument that can change its result, its trainer
and every field of its built training config), fingerprints of the train and test data and of the base model's
files, and the versions of the libraries that train and generate.
"""

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import peft
import torch
import transformers
import trl

import trl_ext

from .config import PennSetup, method_config

# Arguments that never change a method's own result: which methods run, where they are written, the judge and the
# report; and the training fields that only say where and how outputs are written.
NOT_IN_PROVENANCE = {"methods", "output_dir", "overwrite", "judge_base_url", "judge_model", "judge_api_key_env",
                     "judge_pairs", "num_samples_in_report", "seeds"}
TRAINING_NOT_IN_PROVENANCE = {"output_dir", "report_to", "run_name", "disable_tqdm"}


def data_fingerprint(dataset) -> str:
    """SHA-256 of the rows of a `datasets.Dataset`, in order: equal exactly when the data are."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


def model_fingerprint(model_path: str) -> str:
    """SHA-256 over the names and contents of the files of a local model directory (a hub id is resolved to its
    cached snapshot, which the base model's loading has fetched)."""
    path = Path(model_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_path, local_files_only=True))
    digest = hashlib.sha256()
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def provenance(method: str, setup: PennSetup, data: dict[str, str], model: str) -> dict:
    """What produced `method`'s result: settings, data and model fingerprints (from [`data_fingerprint`],
    [`model_fingerprint`]) and versions."""
    settings = {key: value for key, value in asdict(setup.args).items() if key not in NOT_IN_PROVENANCE}
    trainer, training = None, {}
    if method != "base":
        trainer = setup.training[method]["trainer"]
        training = {key: value for key, value in method_config(method, setup)[1].to_dict().items()
                    if key not in TRAINING_NOT_IN_PROVENANCE}
    return json.loads(json.dumps({  # as a stored result reads it back: tuples as lists
        "method": method,
        "settings": {**settings, **asdict(setup.model)},
        "trainer": trainer,
        "training": training,
        "data": data,
        "model": model,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers":
                     transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
                     "trl_ext": trl_ext.__version__},
    }, default=str))


def differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """`"key: old -> new"` for every leaf that differs between two provenance dicts."""
    lines = []
    for key in sorted(set(stored) | set(current), key=str):
        old, new = stored.get(key, "(none)"), current.get(key, "(none)")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return lines


def reusable_result(result_file: Path, current: dict) -> tuple[dict | None, str]:
    """The stored result if it was produced by exactly `current`, else `None`; and why, for the log."""
    if not result_file.exists():
        return None, "no stored result"
    stored = json.loads(result_file.read_text())
    if "provenance" not in stored:
        return None, "the stored result does not record what produced it"
    changed = differences(stored["provenance"], current)
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        return None, f"the stored result came from other settings ({shown})"
    return stored, "the stored result came from the same settings, data, model and versions"
