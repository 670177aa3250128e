"""Step 2 of the Llama-2 stack-exchange pipeline: QLoRA DPO (or DPOP, or any trl_ext DPO loss) on `data/rl`, starting
from the merged SFT model, with the policy's adapter disabled as the reference.

```bash
accelerate launch recipes/llama2_dpo.py                        # the published setup, after recipes/llama2_sft.py
accelerate launch recipes/llama2_dpo.py --loss_type dpop --output_dir outputs/llama2-dpop
accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/llama2_dpo.py   # DDP
```

Reads `recipes/configs/llama2_dpo.yaml` unless `--config` names another file; every field is also a flag. Prompts are
`"Question: <question>\n\nAnswer:"`, capped at `--max_prompt_tokens` (the end is kept); pairs longer than
`--max_length` tokens are dropped.
"""

# First: trl_ext drops the CPU-kernel notice bitsandbytes prints when peft (also through trl) imports it
import trl_ext  # noqa: F401

# isort: split

import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig

import stack_exchange
from trl_ext import DPOConfig, DPOTrainer
from trl_ext.cli import run_command
from trl_ext.data import prepare_preference_pairs
from trl_ext.scripts.common import model_and_tokenizer, reward_summary, train_and_save


@dataclass
class DPODataArguments(stack_exchange.StackExchangeArguments):
    data_dir: str = field(default="data/rl")
    eval_data_dir: str = field(default="data/evaluation")
    eval_samples: int = field(default=1000, metadata={
        "help": "Leading pairs of the evaluation split evaluated (the reference's 1,000: the split holds millions); "
                "0: all."})
    max_prompt_tokens: int = field(default=512, metadata={"help": "Prompts keep their last this many tokens."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for mapping and filtering the data."})

    def __post_init__(self):
        if self.max_prompt_tokens < 2:
            raise ValueError(f"`max_prompt_tokens` must be >= 2, got {self.max_prompt_tokens}.")
        if self.eval_samples < 0:
            raise ValueError(f"`eval_samples` must be >= 0 (0: the whole split), got {self.eval_samples}.")


def load_pairs(data_args: DPODataArguments, data_dir: str, tokenizer, max_length: int | None,
               samples: int = 0):
    dataset = stack_exchange.load_split(data_args.dataset_name, data_dir)
    if samples:
        dataset = dataset.select(range(min(samples, len(dataset))))
    dataset = dataset.map(stack_exchange.preference_pair, remove_columns=dataset.column_names,
                          num_proc=data_args.num_proc)
    return prepare_preference_pairs(dataset, tokenizer, data_args.max_prompt_tokens, max_length,
                                    num_proc=data_args.num_proc)


def main(data_args: DPODataArguments, training_args: DPOConfig, model_args: ModelConfig) -> DPOTrainer:
    model_path, tokenizer = model_and_tokenizer(model_args, training_args)
    with training_args.main_process_first(desc="preparing the preference pairs"):
        train_dataset = load_pairs(data_args, data_args.data_dir, tokenizer, training_args.max_length)
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = load_pairs(data_args, data_args.eval_data_dir, tokenizer, training_args.max_length,
                                      data_args.eval_samples)
    trainer = train_and_save(DPOTrainer, model_path, model_args, training_args, train_dataset, eval_dataset, tokenizer)
    trainer.accelerator.print(reward_summary(trainer.state.log_history))
    return trainer


def parse_args(argv: list[str] | None = None) -> tuple[DPODataArguments, DPOConfig, ModelConfig]:
    """What `main` takes from `accelerate launch recipes/llama2_dpo.py ARGV`, read over `configs/llama2_dpo.yaml`."""
    return stack_exchange.parse_recipe_args((DPODataArguments, DPOConfig, ModelConfig), argv, "llama2_dpo.yaml")


if __name__ == "__main__":
    sys.exit(run_command(main, parse_args, own_code=Path(__file__).parent))
