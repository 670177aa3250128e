"""Dataset loading and preparation shared by the recipes: local JSON/JSONL files or directories, or hub datasets."""

from pathlib import Path

from datasets import DatasetDict, IterableDatasetDict, load_dataset

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset_any(
    name_or_path: str, config_name: str | None = None, streaming: bool = False
) -> DatasetDict | IterableDatasetDict:
    """Loads `name_or_path` as a dict of splits.

    A local `.json` (a list of objects, or one object per line), `.jsonl`, `.csv` or `.parquet` file becomes a single
    `train` split; a local directory or a hub name goes to `datasets.load_dataset` unchanged.
    """
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(
                f"Cannot read dataset file {path}: expected one of {sorted(LOCAL_SUFFIXES)}, got `{path.suffix}`."
            )
        return load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), streaming=streaming)
    return load_dataset(name_or_path, name=config_name, streaming=streaming)


def move_prompt_whitespace_to_completions(example: dict) -> dict:
    """Moves the prompt's trailing whitespace to the start of `chosen` and `rejected`.

    Tokenizers attach a space to the word after it (`"Answer: "` + `"Yes"` gives `"Answer", ":", "▁Yes"`), so a
    prompt ending in a space tokenizes differently alone than before its completion. TRL then starts the completion
    where the two diverge and drops the prompt's last token. Ending the prompt on a word keeps the text identical
    and makes the tokenized prompt a prefix of prompt + completion.
    """
    prompt = example["prompt"].rstrip()
    whitespace = example["prompt"][len(prompt):]
    return {**example, "prompt": prompt, "chosen": whitespace + example["chosen"],
            "rejected": whitespace + example["rejected"]}


def keep_last_prompt_tokens(example: dict, tokenizer, max_prompt_tokens: int) -> dict:
    """Cuts the prompt's start so that it tokenizes to at most `max_prompt_tokens` tokens (special tokens included,
    as TRL tokenizes it), keeping its end, which leads into the completion. The cut falls at a token's first character,
    so the kept text is unchanged (no decode round trip)."""
    prompt = example["prompt"]
    while (excess := len(tokenizer(prompt)["input_ids"]) - max_prompt_tokens) > 0:
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        # Retokenizing the cut text can merge its first characters differently, hence the loop.
        cut = offsets[min(excess, len(offsets) - 1)][0]
        if cut == 0:
            raise ValueError(f"`max_prompt_tokens={max_prompt_tokens}` leaves no room for any prompt text.")
        prompt = prompt[cut:]
    return {**example, "prompt": prompt}


def pair_token_lengths(example: dict, tokenizer) -> tuple[int, int]:
    """Tokens of prompt + chosen and prompt + rejected as TRL's DPOTrainer builds them (EOS appended)."""
    eos = tokenizer.eos_token or ""

    def length(completion: str) -> int:
        text = example["prompt"] + completion
        return len(tokenizer(text if text.endswith(eos) else text + eos)["input_ids"])

    return length(example["chosen"]), length(example["rejected"])


def prepare_preference_pairs(dataset, tokenizer, max_prompt_tokens: int | None, max_length: int | None, **map_kwargs):
    """Readies `prompt`/`chosen`/`rejected` text for TRL's DPOTrainer: ends each prompt on a word (see
    [`move_prompt_whitespace_to_completions`]), keeps the last `max_prompt_tokens` tokens of each prompt, and drops
    the pairs whose prompt + chosen or prompt + rejected exceeds `max_length` tokens, rather than truncating them."""
    dataset = dataset.map(move_prompt_whitespace_to_completions, **map_kwargs)
    if max_prompt_tokens is not None:
        dataset = dataset.map(keep_last_prompt_tokens, fn_kwargs={"tokenizer": tokenizer,
                                                                  "max_prompt_tokens": max_prompt_tokens}, **map_kwargs)
    if max_length is not None:
        dataset = dataset.filter(lambda example: max(pair_token_lengths(example, tokenizer)) <= max_length,
                                 **map_kwargs)
    return dataset
