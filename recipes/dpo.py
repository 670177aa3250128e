"""DPO-family training with trl_ext's DPOTrainer: TRL's loss types plus `dpop`, `dpop_norm` and registered losses.

Every `trl_ext.DPOConfig`, `trl.ModelConfig` and `trl.ScriptArguments` field is a command-line flag, and
`--config file.yaml` sets any of them:

```bash
# DPOP with LoRA on the embedded SmolLM2-135M-Instruct, offline on CPU
python recipes/dpo.py --config recipes/configs/dpop_smollm2.yaml

# the same on another model and dataset
accelerate launch recipes/dpo.py --config recipes/configs/dpop_smollm2.yaml \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized --bf16
```

`--dataset_name` takes a hub dataset or a local `.json`/`.jsonl` file of `prompt`/`chosen`/`rejected` objects;
`--model_name_or_path` takes a hub id, a local directory or `embedded:smollm2-135m-instruct`.
"""

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_ext import DPOConfig, DPOTrainer
from trl_ext.data import load_dataset_any

SUMMARY_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "dpop/penalty", "dpop/active")


def main(script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelConfig) -> DPOTrainer:
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    dataset = load_dataset_any(
        script_args.dataset_name, script_args.dataset_config, streaming=script_args.dataset_streaming
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"Evaluation is on (`eval_strategy={training_args.eval_strategy}`) but the dataset has no "
                f"`{script_args.dataset_test_split}` split (it has {list(dataset)}): set `--dataset_test_split` or "
                "`--eval_strategy no`."
            )
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = DPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(reward_summary(trainer.state.log_history))
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    return trainer


def reward_summary(log_history: list[dict]) -> str:
    """A table of the first and last logged training step's loss, rewards and DPOP metrics."""
    steps = [entry for entry in log_history if "rewards/chosen" in entry and "loss" in entry]
    if not steps:
        return "No training step was logged."
    first, last = steps[0], steps[-1]
    keys = [key for key in SUMMARY_KEYS if key in last]
    lines = [f"{'metric':<20}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}"]
    lines += [f"{key:<20}{first[key]:>12.4f}{last[key]:>12.4f}" for key in keys]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
