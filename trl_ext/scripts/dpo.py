"""DPO-family training with trl_ext's DPOTrainer: TRL's loss types plus `dpop`, `dpop_norm` and registered losses.

Every `trl_ext.DPOConfig`, `trl.ModelConfig` and `trl.ScriptArguments` field is a command-line flag, and
`--config file.yaml` sets any of them; the `--eval_gen_*` flags watch generations while training
(`trl_ext.GenerationEvalCallback`). `--dataset_name` takes a hub dataset or a local `.json`/`.jsonl` file of
`prompt`/`chosen`/`rejected` objects; `--model_name_or_path` a hub id, a local directory or
`embedded:smollm2-135m-instruct`.
"""

from trl import ModelConfig

from ..trainers import DPOConfig, DPOTrainer
from .common import (
    GenerationEvalArguments,
    ScriptArguments,
    check_input_paths,
    load_train_and_eval,
    model_init_kwargs,
    parse_command_line,
    reward_summary,
    train_and_save,
)

ARGUMENTS = (ScriptArguments, DPOConfig, ModelConfig, GenerationEvalArguments)


def main(script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelConfig,
         generation_eval: GenerationEvalArguments) -> DPOTrainer:
    check_input_paths(script_args, model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args.model_init_kwargs)
    train_dataset, eval_dataset = load_train_and_eval(script_args, training_args)
    trainer = train_and_save(DPOTrainer, model_args.model_name_or_path, model_args, training_args, train_dataset,
                             eval_dataset, generation_eval=generation_eval)
    trainer.accelerator.print(reward_summary(trainer.state.log_history))
    return trainer


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> tuple:
    """The arguments `main` takes (one instance of each of `ARGUMENTS`), from `argv` (default: the command line);
    `prog` names the command in `--help`."""
    return parse_command_line(ARGUMENTS, argv, prog)
