"""KL-SFT's frozen reference: which model it is, its per-token log-probs, and precomputing them before training.

The reference is the model as training starts:
- `ref_model`, if the user passes one;
- a PEFT model trained with a new adapter: the same model with its adapter disabled (no second copy);
- a PEFT model that arrives with an adapter already trained: a frozen copy of that adapter, loaded under the name
  `"ref"` (as `trl.DPOTrainer` does), since disabling it would regularise toward the base model instead;
- otherwise a frozen copy of the initial model, or none at all when its log-probs are precomputed.
"""

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import is_peft_model, tqdm
from datasets import Dataset

from ..trl_contract import (
    add_fused_lm_head,
    create_reference_model,
    disable_gradient_checkpointing,
    prepare_inputs,
    use_adapter,
)

REFERENCE_ADAPTER = "ref"


def keep_starting_adapter_as_reference(model) -> None:
    """Makes the `"ref"` adapter (added if missing) a frozen copy of `model`'s current `default` adapter."""
    if REFERENCE_ADAPTER not in model.peft_config:
        model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    for name, parameter in model.named_parameters():
        if ".default." in name:
            reference = model.get_parameter(name.replace(".default.", f".{REFERENCE_ADAPTER}."))
            reference.data.copy_(parameter.data)
            reference.requires_grad_(False)


def build_reference(trainer, ref_model):
    """The frozen reference model to run, or `None` when the policy itself serves: with its PEFT adapter disabled or
    swapped for `"ref"`, or untrained while reference log-probs are precomputed."""
    if ref_model is None and (is_peft_model(trainer.model) or trainer.args.precompute_ref_log_probs):
        return None
    if ref_model is None:
        ref_model = create_reference_model(trainer.model)  # a frozen copy, fused head included
    else:
        add_fused_lm_head(ref_model)
    ref_model.requires_grad_(False).eval()  # eval: no dropout in the reference
    if trainer.args.precompute_ref_log_probs:  # used once, then dropped: not registered with the accelerator for good
        return ref_model.to(trainer.accelerator.device)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)


def reference_token_logps(trainer, inputs) -> torch.Tensor:
    """`(B, T - 1)` log-probability of each label under the reference, 0 where the label is ignored."""
    policy_is_reference = trainer.ref_model is None and not is_peft_model(trainer.model)
    if policy_is_reference and trainer.state.global_step > 0:
        raise ValueError(
            "This batch has no precomputed reference log-probs, and after training has started no reference model "
            "is left (`precompute_ref_log_probs=True`, full fine-tuning): pass evaluation data as `eval_dataset` "
            "when creating the trainer, or pass a `ref_model`."
        )
    model_inputs = {**inputs, "use_cache": False, "fused_lm_head": True}
    # In the training's mixed precision also when precomputed, before `train()` prepares the model (as TRL's DPO does)
    if trainer.ref_model is not None:
        with torch.no_grad(), trainer.accelerator.autocast():
            return trainer.ref_model(**model_inputs).log_probs
    # The policy serves as the reference: without dropout (the base model's and the adapters'), as a separate
    # reference runs, then back in the mode it trains in
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs), \
            in_eval_mode(trainer.model), trainer.accelerator.autocast():
        if policy_is_reference:  # before the first step, the untrained policy is the reference
            return trainer.model(**model_inputs).log_probs
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in unwrapped.peft_config else None  # None: disabled
        with use_adapter(unwrapped, adapter_name=adapter):
            return trainer.model(**model_inputs).log_probs


@contextlib.contextmanager
def in_eval_mode(model: torch.nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def precompute_reference_logps(trainer) -> tuple[Dataset, Dataset | dict | None, "PadReferenceLogps"]:
    """The trainer's train and eval datasets with each example's reference log-probs (`ref_token_logps`), and its
    collator wrapped to pad them. Every process computes the whole dataset (no gather of variable-length rows),
    once."""
    train_dataset = _with_reference_logps(trainer, trainer.train_dataset)
    eval_dataset = trainer.eval_dataset
    if isinstance(eval_dataset, dict):
        eval_dataset = {name: _with_reference_logps(trainer, dataset) for name, dataset in eval_dataset.items()}
    elif eval_dataset is not None:
        eval_dataset = _with_reference_logps(trainer, eval_dataset)
    return train_dataset, eval_dataset, PadReferenceLogps(trainer.data_collator)


def _with_reference_logps(trainer, dataset: Dataset) -> Dataset:
    """`dataset` with a `ref_token_logps` column: each example's reference log-probs, aligned with its labels."""
    if not isinstance(dataset, Dataset):
        raise ValueError("`precompute_ref_log_probs=True` needs map-style datasets, not an `IterableDataset`.")
    inputs_only = dataset.select_columns([name for name in ("input_ids", "labels") if name in dataset.column_names])
    loader = torch.utils.data.DataLoader(
        inputs_only, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator
    )
    rows = []
    progress_off = trainer.args.disable_tqdm or not trainer.is_local_process_zero()
    for batch in tqdm(loader, desc="Computing reference log-probs", disable=progress_off):
        batch = prepare_inputs(trainer, batch)
        token_logps = reference_token_logps(trainer, batch).cpu()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        rows += [row[: length - 1].tolist() for row, length in zip(token_logps, lengths, strict=True)]
    return dataset.add_column("ref_token_logps", rows)


class PadReferenceLogps:
    """Wraps a collator to pad each example's `ref_token_logps` to the batch's `(B, T - 1)` shifted labels."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        if "ref_token_logps" not in examples[0]:  # data prepared after construction, e.g. passed to `evaluate`
            return self.collator(examples)
        ref_rows = [torch.tensor(example.pop("ref_token_logps")) for example in examples]
        batch = self.collator(examples)
        padded = torch.zeros(len(ref_rows), batch["input_ids"].size(1) - 1)
        for row, values in zip(padded, ref_rows, strict=True):
            row[: len(values)] = values  # TRL's collator pads on the right
        batch["ref_token_logps"] = padded
        return batch
