"""Supervised fine-tuning with trl_ext's SFTTrainer: TRL's `nll` and `dft` plus `kl_sft` and `ift`.

Every `trl_ext.SFTConfig`, `trl.ModelConfig` and `trl.ScriptArguments` field is a command-line flag, and
`--config file.yaml` sets any of them; the `--eval_gen_*` flags watch generations while training
(`trl_ext.GenerationEvalCallback`). `--dataset_name` takes a hub dataset or a local `.json`/`.jsonl` file in any
format `trl.SFTTrainer` takes (`text`, `prompt`/`completion`, `messages`) or preference pairs, whose `chosen` is
learned; `--model_name_or_path` a hub id, a local directory or `embedded:smollm2-135m-instruct`.
"""

from trl import ModelConfig

from ..trainers import SFTConfig, SFTTrainer
from .common import (
    GenerationEvalArguments,
    ScriptArguments,
    check_input_paths,
    load_train_and_eval,
    model_init_kwargs,
    parse_command_line,
    train_and_save,
)

ARGUMENTS = (ScriptArguments, SFTConfig, ModelConfig, GenerationEvalArguments)


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig,
         generation_eval: GenerationEvalArguments) -> SFTTrainer:
    check_input_paths(script_args, model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args.model_init_kwargs)
    train_dataset, eval_dataset = load_train_and_eval(script_args, training_args)
    return train_and_save(SFTTrainer, model_args.model_name_or_path, model_args, training_args, train_dataset,
                          eval_dataset, generation_eval=generation_eval)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> tuple:
    """The arguments `main` takes (one instance of each of `ARGUMENTS`), from `argv` (default: the command line);
    `prog` names the command in `--help`."""
    return parse_command_line(ARGUMENTS, argv, prog)
