"""Step 1 of the Llama-2 stack-exchange pipeline: QLoRA SFT on `data/finetune`, then the adapter merged into a bf16
copy of the base for DPO (TRL's former `stack_llama_2` example on trl_ext's SFTTrainer).

```bash
accelerate launch recipes/llama2_sft.py                        # the published setup: Llama-2-7B, 4-bit, one GPU
accelerate launch recipes/llama2_sft.py --loss_type kl_sft     # KL-SFT; the reference: the adapter disabled
accelerate launch recipes/llama2_sft.py --loss_type ift        # IFT
# offline on CPU (the README has the whole pipeline): the embedded model and the shipped sample, 4-bit + LoRA
accelerate launch --cpu recipes/llama2_sft.py --model_name_or_path embedded:smollm2-135m-instruct \
    --dataset_name recipes/data/stack_exchange_sample --bf16 false --dtype float32 --optim adamw_torch \
    --warmup_steps 0 --max_steps 10 --gradient_accumulation_steps 1 --max_length 256 --learning_rate 1e-3 \
    --output_dir outputs/se-sft
```

Reads `recipes/configs/llama2_sft.yaml` unless `--config` names another file; every field is also a flag.
"""

# First: trl_ext drops the CPU-kernel notice bitsandbytes prints when peft (also through trl) imports it
import trl_ext  # noqa: F401

# isort: split

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import ModelConfig, get_peft_config

import stack_exchange
from merge_adapter import merge_adapter
from trl_ext import SFTConfig, SFTTrainer
from trl_ext.cli import run_command
from trl_ext.scripts.common import model_and_tokenizer, train_and_save


@dataclass
class SFTDataArguments(stack_exchange.StackExchangeArguments):
    data_dir: str = field(default="data/finetune")
    streaming: bool = field(default=True, metadata={"help": "Stream the data instead of downloading it whole."})
    shuffle_buffer: int = field(default=5000, metadata={
        "help": "Streamed examples shuffled together (the Trainer shuffles a downloaded dataset itself)."})
    eval_size: int = field(
        default=4000, metadata={"help": "Leading examples held out for evaluation, when `eval_strategy` is set."}
    )
    merge: bool = field(default=True, metadata={"help": "Merge the trained adapter into the base when done."})
    merged_dir: str | None = field(default=None, metadata={"help": "Where the merged model goes; <output_dir>/merged."})
    merge_dtype: str = field(default="bfloat16", metadata={"choices": ["bfloat16", "float16", "float32"]})

    def __post_init__(self):
        if self.shuffle_buffer < 1:
            raise ValueError(f"`shuffle_buffer` must be >= 1 (1: the stream's own order), got {self.shuffle_buffer}.")


def sft_splits(data_args: SFTDataArguments, training_args: SFTConfig):
    """The SFT texts to train on, and the leading `eval_size` held out when evaluation is on (else None). Streamed
    training texts are shuffled in a buffer: a question's answer pairs are stored together, and packing would lay
    them side by side."""
    dataset = stack_exchange.load_split(data_args.dataset_name, data_args.data_dir, data_args.streaming)
    dataset = dataset.map(stack_exchange.sft_text, remove_columns=dataset.column_names)
    train_dataset, eval_dataset = dataset, None
    if training_args.eval_strategy != "no":
        train_dataset, eval_dataset = dataset.skip(data_args.eval_size), dataset.take(data_args.eval_size)
    if data_args.streaming:
        train_dataset = train_dataset.shuffle(buffer_size=data_args.shuffle_buffer, seed=training_args.seed)
    return train_dataset, eval_dataset


def main(data_args: SFTDataArguments, training_args: SFTConfig, model_args: ModelConfig) -> SFTTrainer:
    model_path, tokenizer = model_and_tokenizer(model_args, training_args)
    train_dataset, eval_dataset = sft_splits(data_args, training_args)
    trainer = train_and_save(SFTTrainer, model_path, model_args, training_args, train_dataset, eval_dataset, tokenizer)

    if data_args.merge and get_peft_config(model_args) is not None:
        trainer.accelerator.wait_for_everyone()
        merged_dir = data_args.merged_dir or f"{training_args.output_dir}/merged"
        if trainer.accelerator.is_main_process:  # on CPU: a bf16 7B model needs 14 GB of RAM, not of GPU memory
            # Under ZeRO-3, transformers would load the base partitioned, with collectives the waiting processes
            # never join: the merge loads it whole, on this process alone
            unset_hf_deepspeed_config()
            merge_adapter(training_args.output_dir, merged_dir, data_args.merge_dtype)
            print(f"Merged model saved to {merged_dir}: the starting point of recipes/llama2_dpo.py.")
        trainer.accelerator.wait_for_everyone()
    return trainer


def parse_args(argv: list[str] | None = None) -> tuple[SFTDataArguments, SFTConfig, ModelConfig]:
    """What `main` takes from `accelerate launch recipes/llama2_sft.py ARGV`, read over `configs/llama2_sft.yaml`."""
    return stack_exchange.parse_recipe_args((SFTDataArguments, SFTConfig, ModelConfig), argv, "llama2_sft.yaml")


if __name__ == "__main__":
    sys.exit(run_command(main, parse_args, own_code=Path(__file__).parent))
