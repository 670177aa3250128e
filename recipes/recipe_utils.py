"""Helpers shared by the recipes: default configs, model loading arguments, training, and printed summaries."""

import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import AutoTokenizer
from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_ext import resolve_model_name

CONFIGS = Path(__file__).parent / "configs"


def with_default_config(argv: list[str] | None, config_name: str) -> list[str]:
    """`argv` (default: the command line) with `--config configs/<config_name>` first unless it names a config, so the
    recipe runs its published setup with no arguments and every flag still overrides the file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv or any(arg.startswith("--config=") for arg in argv):
        return argv
    return ["--config", str(CONFIGS / config_name), *argv]


def model_init_kwargs(model_args: ModelConfig, configured: dict | None) -> dict:
    """TRL's `model_init_kwargs` from the `ModelConfig` flags; keys set in the training config win."""
    kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation,
              "dtype": model_args.dtype}
    if model_args.load_in_4bit or model_args.load_in_8bit:
        # TRL loads on one device per process for DDP and DeepSpeed; FSDP shards the model itself, so each rank
        # must load its copy unplaced too.
        if PartialState().distributed_type == DistributedType.FSDP:
            kwargs["device_map"] = None
    return {**kwargs, **(configured or {})}


def model_and_tokenizer(model_args: ModelConfig, training_args) -> tuple[str, AutoTokenizer]:
    """The model's path (embedded names resolved) and its tokenizer, padding with EOS if it has no pad token; sets
    `training_args.model_init_kwargs` from the `ModelConfig` flags."""
    model_path = resolve_model_name(model_args.model_name_or_path)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args.model_init_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model_path, tokenizer


def train_and_save(trainer_cls, model, model_args: ModelConfig, training_args, train_dataset, eval_dataset=None,
                   processing_class=None):
    """Builds `trainer_cls` with the quantization and LoRA of the `ModelConfig` flags, trains, saves to `output_dir`."""
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.accelerator.print(model_summary(trainer.model))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved to {training_args.output_dir}.")
    return trainer


def reward_summary(log_history: list[dict], keys: tuple[str, ...] = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "dpop/penalty",
    "dpop/active", "dpop_norm/penalty", "dpop_norm/active",
)) -> str:
    """A table of the first and last logged training step's loss, rewards and DPOP metrics."""
    steps = [entry for entry in log_history if "loss" in entry and "rewards/chosen" in entry]
    if not steps:
        return "No training step was logged."
    first, last = steps[0], steps[-1]
    lines = [f"{'metric':<20}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}"]
    lines += [f"{key:<20}{first[key]:>12.4f}{last[key]:>12.4f}" for key in keys if key in last]
    return "\n".join(lines)


def model_summary(model) -> str:
    """One line on what is trained: the base's precision or quantization, and the trainable parameters."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    if quantization and quantization.get("load_in_4bit"):
        precision = f"4-bit {quantization['bnb_4bit_quant_type']} ({quantization['bnb_4bit_compute_dtype']} compute)"
    elif quantization and quantization.get("load_in_8bit"):
        precision = "8-bit"
    else:
        precision = str(model.dtype).removeprefix("torch.")
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return f"Training {model.config.name_or_path}: base in {precision}, {trainable:,} trainable parameters."
