"""Helpers of the training scripts (`trl-ext dpo|sft`, the recipes): their argument parser and its checks, model
loading arguments, training, printed summaries."""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trl
from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from ..data import glued_rows, load_dataset_any, space_completions
from ..embedded import resolve_model_name
from ..generation_eval import GenerationEvalCallback
from ..paths import check_dataset_path, check_model_path
from ..scorers import DistinctN, RegexMatch, RepeatedNgrams

logger = logging.getLogger(__name__)


class CommandParser(TrlParser):
    """`TrlParser` whose errors raise a `ValueError` with argparse's message, which the command line prints as one
    line, instead of printing the usage of every config field and exiting."""

    def error(self, message: str):
        raise ValueError(f"{message} (`--help` lists the flags)")


def check_config_file(argv: list[str]) -> None:
    """Raises a `ValueError` if `--config PATH` in `argv` names no file, saying where relative paths are read from (and
    where the `recipes/` paths of trl-ext's README are)."""
    configs = [word.partition("=")[2] if word.startswith("--config=") else following
               for word, following in zip(argv, [*argv[1:], None])
               if word == "--config" or word.startswith("--config=")]
    config = configs[0] if configs else None
    if config is None or Path(config).is_file():
        return
    hint = ""
    if Path(config).parts[:1] == ("recipes",):
        hint = (" The `recipes/` paths of trl-ext's README are relative to the root of its repository: run from a "
                "checkout's root, or give the full path.")
    raise ValueError(f"`--config {config}`: no such file in the working directory {Path.cwd()}.{hint}")


# What each required flag takes
REQUIRED_FLAGS = {
    "--model_name_or_path": "a hub id, a local model directory or `embedded:smollm2-135m-instruct`",
    "--dataset_name": "a hub dataset, or a local .json, .jsonl, .csv or .parquet file or a directory",
}


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's script arguments, and how the scripts prepare the dataset's text."""

    space_completions: bool = field(default=True, metadata={
        "help": "Start each completion that would run into its prompt's last word ('over' + 'the campus') with a "
                "space, and log how many; false: train on the text as written (code, numbers, words split on "
                "purpose)."})


def parse_command_line(argument_types: tuple, argv: list[str] | None, prog: str | None) -> tuple:
    """One instance of each of `argument_types` (`ScriptArguments` and `ModelConfig` among them) from `argv`
    (default: the command line) and `--config`; a missing `--model_name_or_path` or `--dataset_name` is refused."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_config_file(argv)
    parsed = CommandParser(argument_types, prog=prog).parse_args_and_config(args=argv)
    model_args = next(arguments for arguments in parsed if isinstance(arguments, ModelConfig))
    script_args = next(arguments for arguments in parsed if isinstance(arguments, trl.ScriptArguments))
    for flag, value in (("--model_name_or_path", model_args.model_name_or_path),
                        ("--dataset_name", script_args.dataset_name)):
        if not value:
            raise ValueError(f"`{flag}` is required, as a flag or in the `--config` file: {REQUIRED_FLAGS[flag]}.")
    return parsed


def check_input_paths(script_args: ScriptArguments, model_args: ModelConfig) -> None:
    """Refuses a model or dataset name that looks like a local path but is not one, before anything loads."""
    check_model_path(model_args.model_name_or_path, "--model_name_or_path")
    check_dataset_path(script_args.dataset_name, "--dataset_name")


@dataclass
class GenerationEvalArguments:
    """`trl_ext.GenerationEvalCallback` from the command line: off unless `--eval_gen_steps` is set."""

    eval_gen_steps: int = field(default=0, metadata={
        "help": "Generate from fixed prompts at the start, every this many steps and at the end, and log "
                "eval_gen/repeated_3gram, eval_gen/distinct_2 (and eval_gen/alignment_accuracy with "
                "--eval_gen_pattern); 0: off."})
    eval_gen_prompts: int = field(default=32, metadata={
        "help": "How many prompts: the first ones of the eval split, else of the train split (its `prompt` column)."})
    eval_gen_pattern: str | None = field(default=None, metadata={
        "help": "A regex; the share of completions matching it is logged as eval_gen/alignment_accuracy."})
    eval_gen_max_new_tokens: int = field(default=32)
    eval_gen_batch_size: int = field(default=8)
    eval_gen_do_sample: bool = field(default=False, metadata={"help": "Sample (seeded by --seed), not greedy."})


def add_generation_eval(trainer, args: GenerationEvalArguments, dataset) -> None:
    """Attaches a `GenerationEvalCallback` to `trainer` as `args` say, on the first prompts of `dataset`."""
    if args.eval_gen_steps <= 0:
        return
    if "prompt" not in (dataset.column_names or []):
        raise ValueError(f"`--eval_gen_steps` generates from the dataset's `prompt` column, which it lacks (it has "
                         f"{dataset.column_names}); use a prompt/completion or preference dataset, or "
                         "`--eval_gen_steps 0`.")
    prompts = [row["prompt"] for row in dataset.take(args.eval_gen_prompts)]
    scorers = [RepeatedNgrams(), DistinctN()]
    if args.eval_gen_pattern is not None:
        scorers.insert(0, RegexMatch(args.eval_gen_pattern))
    trainer.add_callback(GenerationEvalCallback(
        trainer, prompts, scorers, eval_every=args.eval_gen_steps, max_new_tokens=args.eval_gen_max_new_tokens,
        batch_size=args.eval_gen_batch_size, generation_kwargs={"do_sample": args.eval_gen_do_sample},
    ))


def load_train_and_eval(script_args: ScriptArguments, training_args):
    """The train split of `--dataset_name` and, when evaluation is on, its `--dataset_test_split` (else None), with
    completions that would glue to their prompt started with a space (`"over" + "the campus"`) unless
    `--space_completions false`."""
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config,
                               streaming=script_args.dataset_streaming)
    if script_args.space_completions:
        for split, rows in dataset.items():
            glued, example = glued_rows(rows)
            if glued:
                logger.warning("Started %d of %d rows' completions of the %s split with a space: they ran into the "
                               "prompt's last word (e.g. '...%s...'). `--space_completions false` trains on the text "
                               "as written.", glued, len(rows), split, example)
        dataset = dataset.map(space_completions)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"Evaluation is on (`eval_strategy={training_args.eval_strategy}`) but the dataset has no "
                f"`{script_args.dataset_test_split}` split (it has {list(dataset)}): set `--dataset_test_split` or "
                "`--eval_strategy no`."
            )
        eval_dataset = dataset[script_args.dataset_test_split]
    return dataset[script_args.dataset_train_split], eval_dataset


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
    check_model_path(model_args.model_name_or_path, "--model_name_or_path")
    model_path = resolve_model_name(model_args.model_name_or_path)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args.model_init_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model_path, tokenizer


def train_and_save(trainer_cls, model, model_args: ModelConfig, training_args, train_dataset, eval_dataset=None,
                   processing_class=None, generation_eval: GenerationEvalArguments | None = None):
    """Builds `trainer_cls` with the quantization and LoRA of the `ModelConfig` flags (and the generation eval of
    `generation_eval`, on the eval split's prompts if there is one), trains, saves to `output_dir`."""
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if generation_eval is not None:
        add_generation_eval(trainer, generation_eval, train_dataset if eval_dataset is None else eval_dataset)
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
