"""Each Penn-experiment result records what produced it, and a rerun reuses it only on an exact match.

A method's provenance is its settings (every field of `PennArguments` that can change its result), fingerprints of
the train and test data and of the base model's files, and the versions of the libraries that train and generate.
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

# Fields that never change a method's own result: which methods run, where they are written, the judge and the report.
NOT_IN_PROVENANCE = {"methods", "output_dir", "overwrite", "judge_base_url", "judge_model", "judge_api_key_env",
                     "judge_pairs", "num_samples_in_report", "seeds"}
# The loss settings each method reads; another method's loss settings are not part of its provenance.
LOSS_FIELDS = {
    "base": (), "sft": (), "kl_sft": ("kl_coef", "kl_penalty"), "ift": ("ift_lambda", "ift_gamma"),
    "dpo": ("beta", "dpo_loss_type"), "dpop": ("beta", "dpop_loss_type", "dpop_lambda"), "trl_dpo": ("beta",),
    "cdpo": ("beta", "label_smoothing"), "rdpo": ("beta", "rdpo_alpha"), "beta_dpo": ("beta", "beta_dpo_alpha"),
    "npo": ("beta",), "tdpo1": ("beta",), "tdpo2": ("beta", "tdpo_alpha"),
    "sdpo": ("beta", "dpo_loss_type", "sdpo_stages"),
}


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


def provenance(method: str, args, data: dict[str, str], model: str) -> dict:
    """What produced `method`'s result: settings, data and model fingerprints (from [`data_fingerprint`],
    [`model_fingerprint`]) and versions."""
    other_losses = {name for fields in LOSS_FIELDS.values() for name in fields} - set(LOSS_FIELDS[method])
    settings = {key: value for key, value in asdict(args).items()
                if key not in NOT_IN_PROVENANCE | other_losses}
    return {
        "method": method,
        "settings": settings,
        "data": data,
        "model": model,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers":
                     transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
                     "trl_ext": trl_ext.__version__},
    }


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
