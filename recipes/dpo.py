"""DPO-family training with trl_ext's DPOTrainer: TRL's loss types plus `dpop`, `dpop_norm` and registered losses.

Every `trl_ext.DPOConfig`, `trl.ModelConfig` and `trl.ScriptArguments` field is a command-line flag, and
`--config file.yaml` sets any of them:

```bash
# DPOP with LoRA on the embedded SmolLM2-135M-Instruct, offline on CPU
python recipes/dpo.py --config recipes/configs/dpop_smollm2.yaml

# the same on another model and dataset
accelerate launch recipes/dpo.py --config recipes/configs/dpop_smollm2.yaml \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized --bf16 true
```

`--dataset_name` takes a hub dataset or a local `.json`/`.jsonl` file of `prompt`/`chosen`/`rejected` objects;
`--model_name_or_path` takes a hub id, a local directory or `embedded:smollm2-135m-instruct`.
"""

from trl import ModelConfig, ScriptArguments, TrlParser

from recipe_utils import model_init_kwargs, reward_summary, train_and_save
from trl_ext import DPOConfig, DPOTrainer
from trl_ext.data import load_dataset_any, space_completions


def main(script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelConfig) -> DPOTrainer:
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args.model_init_kwargs)
    dataset = load_dataset_any(
        script_args.dataset_name, script_args.dataset_config, streaming=script_args.dataset_streaming
    ).map(space_completions)  # "over" + "the campus" would train on "overthe campus"
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"Evaluation is on (`eval_strategy={training_args.eval_strategy}`) but the dataset has no "
                f"`{script_args.dataset_test_split}` split (it has {list(dataset)}): set `--dataset_test_split` or "
                "`--eval_strategy no`."
            )
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = train_and_save(DPOTrainer, model_args.model_name_or_path, model_args, training_args,
                             dataset[script_args.dataset_train_split], eval_dataset)
    trainer.accelerator.print(reward_summary(trainer.state.log_history))
    return trainer


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, DPOConfig, ModelConfig]:
    """The arguments `main` takes, from `argv` (default: the command line): `python recipes/dpo.py ARGV`."""
    return TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config(args=argv)


if __name__ == "__main__":
    main(*parse_args())
