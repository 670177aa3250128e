"""Preference datasets without `chosen`, which losses registered with `rejected_only=True` (NPO) train on: their
chosen completion is an empty placeholder, whose metrics are not logged."""

from datasets import Dataset, IterableDataset

from ..losses import registered_dpo_loss, registered_dpo_losses


def named_datasets(datasets, default_name: str) -> list[tuple[str, object]]:
    """`(name, dataset)` of a trainer argument that is a dataset, a dict of them, or None."""
    if datasets is None:
        return []
    return list(datasets.items()) if isinstance(datasets, dict) else [(default_name, datasets)]


def dataset_key(dataset) -> object:
    """What identifies a prepared dataset: its fingerprint (`datasets` gives every transformed copy its own), else the
    object (an `IterableDataset`)."""
    return getattr(dataset, "_fingerprint", None) or id(dataset)


def lacks_chosen(dataset, dataset_name: str, args) -> bool:
    """Fails before training if `dataset` lacks the columns the losses read; True if it has `prompt` and `rejected`
    but no `chosen`, which only losses registered with `rejected_only=True` accept (the chosen one is a placeholder)."""
    if not isinstance(dataset, Dataset | IterableDataset) or dataset.column_names is None:
        return False  # streaming datasets with unknown columns are checked by TRL when the first batch is built
    columns = set(dataset.column_names)
    if {"chosen", "rejected"} <= columns or {"chosen_ids", "rejected_ids"} <= columns:
        return False
    if {"prompt", "rejected"} <= columns:
        loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        reading_chosen = [name for name in loss_types
                          if name not in registered_dpo_losses() or not registered_dpo_loss(name).rejected_only]
        if not reading_chosen:
            return True
        rejected_only = [name for name in registered_dpo_losses() if registered_dpo_loss(name).rejected_only]
        raise ValueError(
            f"The {dataset_name} dataset has no `chosen` column, which `loss_type` {reading_chosen} reads. Add "
            f"`chosen` completions, or train only losses that read the rejected completion alone ({rejected_only})."
        )
    raise ValueError(
        f"The {dataset_name} dataset needs `chosen` and `rejected` columns (and optionally `prompt`), TRL's "
        f"preference format; it has {sorted(columns)}. Rename or map your columns, e.g. "
        "`dataset.rename_columns({'response_j': 'chosen', 'response_k': 'rejected'})`."
    )


def placeholder_chosen(example: dict) -> dict:
    """An empty chosen completion, in the rejected one's format: TRL tokenizes it to the EOS token (or the chat
    template's empty assistant turn)."""
    conversational = isinstance(example["rejected"], list)
    return {"chosen": [{"role": "assistant", "content": ""}] if conversational else ""}
