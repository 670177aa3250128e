"""Checks of a training or evaluation dataset's rows, before any step, shared by both trainers.

Before the model loads (the raw rows): an empty dataset, and a missing value (`None`) in a text column, named with
its row. After tokenization: rows that leave nothing to learn, because their completion is empty (or whitespace) or
because truncation to `max_length` left no completion token (TRL then drops them without a word). More than half of
the rows in that state is refused with the numbers; fewer are a warning. Streaming datasets are not counted (reading
them would consume them); TRL checks their rows as it meets them.
"""

import logging

import pyarrow.compute as pc
from datasets import Dataset

logger = logging.getLogger(__name__)

# The text columns of TRL's dataset formats (preference, prompt-completion, language modeling, conversational)
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "text", "messages")


def _is_map_style(dataset) -> bool:
    return isinstance(dataset, Dataset)


def check_dataset_rows(dataset, dataset_name: str) -> None:
    """Raises a `ValueError` if `dataset` (map-style) has no row, or a `None` in one of its text columns."""
    if not _is_map_style(dataset):
        return
    if len(dataset) == 0:
        raise ValueError(f"The {dataset_name} dataset is empty (0 rows, columns {dataset.column_names}): give it at "
                         "least one row, e.g. check the filter or split that built it.")
    columns = [column for column in TEXT_COLUMNS if column in dataset.column_names]
    if not columns:  # tokenized rows
        return
    offset = 0
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=10_000):
        for column in columns:
            if batch.column(column).null_count:
                row = offset + pc.index(pc.is_null(batch.column(column)), True).as_py()
                raise ValueError(
                    f"The {dataset_name} dataset has no value (None) in `{column}` at row {row}: fill it or drop the "
                    f"row, e.g. `dataset = dataset.filter(lambda row: row['{column}'] is not None)`.")
        offset += batch.num_rows


def check_datasets_rows(train_dataset, eval_dataset) -> None:
    """[`check_dataset_rows`] of a trainer's train dataset and eval dataset (or dict of them)."""
    check_dataset_rows(train_dataset, "train")
    evaluated = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
    for name, dataset in evaluated:
        check_dataset_rows(dataset, name)


def is_empty_completion(value, eos_token: str | None) -> bool:
    """Whether a completion is empty or whitespace: text (with the EOS TRL appends), or chat messages."""
    if isinstance(value, str):
        return not value.removesuffix(eos_token or "").strip()
    if isinstance(value, list):
        return all(isinstance(message, dict) and not str(message.get("content") or "").strip() for message in value)
    return False


def _empty_completion_rows(dataset, completion_columns, eos_token):
    """`(row, column)` of each row of `dataset` whose completion in one of `completion_columns` (those it has) is
    empty."""
    columns = [column for column in completion_columns if column in dataset.column_names]
    if not columns:
        return
    offset = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        for index in range(len(batch[columns[0]])):
            column = next((column for column in columns if is_empty_completion(batch[column][index], eos_token)), None)
            if column is not None:
                yield offset + index, column
        offset += len(batch[columns[0]])


def check_completions_left(dataset, kept, dataset_name: str, completion_columns, max_length: int | None,
                           eos_token: str | None) -> None:
    """Counts the rows of `dataset` (the user's rows) that leave no completion to learn from: those TRL dropped from
    `kept` (its prepared rows, in the same order) because truncation to `max_length` left no completion token, and
    those of `kept` whose completion (in the `completion_columns` it has) is empty. Raises a `ValueError` with the
    numbers if they are more than half of the rows, else logs them as a warning. With packing, TRL drops nothing and
    repacks the rows: pass the user's rows as `kept`.

    Relies on TRL's `_prepare_dataset` keeping the text columns (with the EOS it appends) next to the token ids.
    """
    if not (_is_map_style(dataset) and _is_map_style(kept)):
        return
    truncated = len(dataset) - len(kept)
    empty = sum(1 for _ in _empty_completion_rows(kept, completion_columns, eos_token))
    if not truncated + empty:
        return
    found, fixes = [], []
    if truncated:
        found.append(f"{truncated} have no completion token left after truncation to `max_length={max_length}` (the "
                     "prompt alone fills it; TRL drops them)")
        fixes.append("raise `max_length` above the prompts' length in tokens, or shorten the prompts")
    if empty:
        example = next(_empty_completion_rows(dataset, completion_columns, eos_token), None)
        found.append(f"{empty} have an empty completion"
                     + (f" (e.g. `{example[1]}` of row {example[0]})" if example is not None else ""))
        fixes.append("fill or drop the rows with an empty completion")
    message = (f"{truncated + empty} of {len(dataset)} rows of the {dataset_name} dataset have no completion to learn "
               f"from: {'; '.join(found)}.")
    if 2 * (truncated + empty) > len(dataset):
        raise ValueError(f"{message} That is more than half of the rows, so training is refused: {'; '.join(fixes)}.")
    logger.warning("%s Training goes on with the others; to use every row, %s.", message, "; ".join(fixes))
