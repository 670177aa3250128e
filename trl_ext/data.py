"""Dataset loading and preparation shared by the recipes: local JSON/JSONL files or directories, or hub datasets."""

import codecs
import json
import logging
import unicodedata
from pathlib import Path

from datasets import DatasetDict, IterableDatasetDict, load_dataset

from .paths import check_dataset_path

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
JSON_LAYOUT = 'a list of objects or one object per line, e.g. `[{"prompt": ..., "chosen": ..., "rejected": ...}]`'
logger = logging.getLogger(__name__)
JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
                   bool: "a boolean", type(None): "null"}


def _decode_utf8(path: Path, data: bytes, offset: int, line: int) -> str:
    """Decodes `data`, which starts at byte `offset` and line `line` of `path`, naming the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line += data.count(b"\n", 0, error.start)
        raise ValueError(f"Dataset file {path} is not valid UTF-8: byte 0x{data[error.start]:02x} at byte offset "
                         f"{offset + error.start} (line {line}); re-save it as UTF-8.") from None


def _read_json_document(path: Path):
    """Parses all of `path` as one JSON value, naming the line of a syntax error."""
    data = path.read_bytes()
    # `datasets` skips a leading BOM too; offsets stay those of the file.
    text = _decode_utf8(path, data, 0, 1).removeprefix("\ufeff")
    del data
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Dataset file {path}, line {error.lineno}: invalid JSON ({error.msg} at column "
                         f"{error.colno}); the file must hold {JSON_LAYOUT}.") from None


def _top_level_object_error(path: Path, value: dict) -> ValueError:
    """The error for a file holding one object (e.g. `{"data": [...]}`) instead of rows."""
    keys = ", ".join(map(repr, list(value)[:8])) + (", ..." if len(value) > 8 else "")
    return ValueError(f"Dataset file {path} holds a single JSON object with keys [{keys}], but trl_ext expects "
                      f"{JSON_LAYOUT}; move the rows into such a list.")


def _check_json_list(path: Path) -> None:
    """Checks a file starting with `[`: a non-empty list of objects."""
    rows = _read_json_document(path)
    if not rows:
        raise ValueError(f"Dataset file {path} holds an empty list; it must hold {JSON_LAYOUT}.")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            # `datasets` would turn a list of strings into a `text` column; the recipes need named fields.
            raise ValueError(f"Dataset file {path}: the list item at index {index} is "
                             f"{JSON_TYPE_NAMES[type(row)]}, not an object; the file must hold "
                             f"{JSON_LAYOUT}.")


def _check_json_lines(path: Path) -> None:
    """Checks a file as JSON Lines, one line at a time: one object per non-blank line."""
    first_row, rows, offset = None, 0, 0
    with path.open("rb") as file:
        # Lines are split on b"\n" as pyarrow does; no multi-byte UTF-8 character contains that byte.
        for number, line in enumerate(file, start=1):
            start, offset = offset, offset + len(line)
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line, start = line[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
            text = _decode_utf8(path, line, start, number)
            if not text.strip():  # `datasets` skips blank lines
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                if not rows and text.lstrip().startswith("{"):
                    # Likely one pretty-printed object rather than JSON Lines: judge the file as a whole.
                    document = _read_json_document(path)
                    if isinstance(document, dict):
                        raise _top_level_object_error(path, document) from None
                raise ValueError(f"Dataset file {path}, line {number}: invalid JSON ({error.msg} at column "
                                 f"{error.colno}); each line must hold one JSON object.") from None
            if not isinstance(row, dict):
                raise ValueError(f"Dataset file {path}, line {number}: expected a JSON object, got "
                                 f"{JSON_TYPE_NAMES[type(row)]}; each line must hold one JSON object.")
            if not rows:
                first_row = row
            rows += 1
    if not rows:
        raise ValueError(f"Dataset file {path} is empty; it must hold {JSON_LAYOUT}.")
    if rows == 1 and path.suffix == ".json":
        # A `.json` file holding one object is far more often `json.dump(dict)` than a one-row dataset, and
        # `datasets` would silently make it a single row with the object's keys as columns.
        raise _top_level_object_error(path, first_row)


def check_json_file(path: str | Path) -> None:
    """Raises a `ValueError` naming the file, the place and the fix unless `path` holds a JSON list of objects or
    JSON Lines (one object per line, blank lines allowed) in UTF-8, as `datasets`' json loader reads them.

    JSON Lines are checked line by line, so a large file is never held whole; a file starting with `[` is parsed
    whole, as `datasets` does anyway.
    """
    path = Path(path)
    with path.open("rb") as file:
        # The first byte that is not a BOM or whitespace tells a list from JSON Lines, as in `datasets`.
        head = file.read(1 << 16).removeprefix(codecs.BOM_UTF8).lstrip()
        while not head and (chunk := file.read(1 << 16)):
            head = chunk.lstrip()
    if head.startswith(b"["):
        _check_json_list(path)
    else:
        _check_json_lines(path)


def load_dataset_any(
    name_or_path: str, config_name: str | None = None, streaming: bool = False
) -> DatasetDict | IterableDatasetDict:
    """Loads `name_or_path` as a dict of splits.

    A local `.json` (a list of objects, or one object per line), `.jsonl`, `.csv` or `.parquet` file becomes a single
    `train` split; a local directory or a hub name goes to `datasets.load_dataset` unchanged. A local JSON file is
    first checked with [`check_json_file`], so that a malformed one fails with its path and line; a name that looks
    like a local path but does not exist fails at once (see `trl_ext.paths`), never reaching the hub.
    """
    check_dataset_path(name_or_path, "name_or_path")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(
                f"Cannot read dataset file {path}: expected one of {sorted(LOCAL_SUFFIXES)}, got `{path.suffix}`."
            )
        if LOCAL_SUFFIXES[path.suffix] == "json":
            # `datasets` reports these mistakes without the file or line, or loads a wrong dataset.
            check_json_file(path)
        return load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), streaming=streaming)
    return load_dataset(str(path) if path.is_dir() else name_or_path, name=config_name, streaming=streaming)


COMPLETION_COLUMNS = ("chosen", "rejected", "completion")
# Scripts written without spaces between words: a prompt and completion in them join as they are.
UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


def _is_spaced_word_character(char: str) -> bool:
    return char.isalnum() and not unicodedata.name(char, "").startswith(UNSPACED_SCRIPTS)


def glues_words(prompt: str, completion: str) -> bool:
    """Whether `prompt + completion`, the way TRL joins them, runs two words together.

    True when the prompt ends in a letter, digit or sentence punctuation and the completion starts with a letter or
    digit, with no whitespace between (`"The sun was setting over"` + `"the campus"`). A number split between the
    two (`"1"` + `"00"`, `"3."` + `"14"`) and scripts written without spaces (Chinese, Japanese, Thai, ...) are not
    glue.
    """
    if not prompt or not completion or not _is_spaced_word_character(completion[0]):
        return False
    last = prompt[-1]
    if completion[0].isdigit() and (last.isdigit() or last == "."):
        return False
    return _is_spaced_word_character(last) or last in ".,;:!?"


def space_completions(example: dict) -> dict:
    """Starts each completion (`chosen`, `rejected`, `completion`) that [`glues_words`] to its prompt with one
    space, as a writer would separate them; every other text is returned unchanged. For `datasets.Dataset.map`."""
    prompt = example.get("prompt")
    if not isinstance(prompt, str):  # conversational rows are joined by the chat template
        return example
    return {**example, **{column: " " + example[column] for column in COMPLETION_COLUMNS
                          if isinstance(example.get(column), str) and glues_words(prompt, example[column])}}


def glued_rows(dataset) -> tuple[int, str | None]:
    """How many rows of `dataset` (a `datasets.Dataset` of text prompts and completions) run words together at the
    prompt/completion boundary ([`glues_words`]), and the first such boundary; `(0, None)` for streaming, tokenized,
    prompt-less or conversational datasets."""
    columns = [column for column in COMPLETION_COLUMNS if column in (getattr(dataset, "column_names", None) or [])]
    if not columns or "prompt" not in dataset.column_names or not hasattr(dataset, "__len__"):
        return 0, None
    glued, example = 0, None
    for batch in dataset.select_columns(["prompt", *columns]).iter(batch_size=1024):
        for index, prompt in enumerate(batch["prompt"]):
            if not isinstance(prompt, str):
                return 0, None  # conversational rows are joined by the chat template
            completion = next((batch[column][index] for column in columns if isinstance(batch[column][index], str)
                               and glues_words(prompt, batch[column][index])), None)
            if completion is not None:
                glued += 1
                example = example or prompt[-24:] + completion[:24]
    return glued, example


def warn_if_words_glue(dataset, dataset_name: str) -> None:
    """Logs one warning with the count, an example and the fix if rows of `dataset` would run words together at the
    prompt/completion boundary."""
    glued, example = glued_rows(dataset)
    if glued:
        logger.warning(
            "%d of %d rows of the %s dataset join prompt and completion without a space (e.g. '...%s...'), and TRL "
            "trains on them as joined. Start each completion with a space: "
            "`dataset = dataset.map(trl_ext.data.space_completions)`.", glued, len(dataset), dataset_name, example)


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
    so the kept text is unchanged (no decode round trip) but for the whitespace it would start with."""
    prompt = example["prompt"]
    while (excess := len(tokenizer(prompt)["input_ids"]) - max_prompt_tokens) > 0:
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        # Retokenizing the cut text can merge its first characters differently, hence the loop. SentencePiece
        # tokenizers (Llama's) start text before a digit or a newline with a lone "▁" token sharing the next token's
        # start: the cut is the first start after the skipped tokens that moves past the text's own.
        cut = next((start for start, _ in offsets[excess:] if start > 0), None)
        if cut is None:
            raise ValueError(f"`max_prompt_tokens={max_prompt_tokens}` leaves no room for any prompt text.")
        prompt = prompt[cut:].lstrip()
    return {**example, "prompt": prompt}


def pair_token_lengths(example: dict, tokenizer) -> tuple[int, int]:
    """Tokens of prompt + chosen and prompt + rejected as TRL's DPOTrainer builds them (EOS appended)."""
    eos = tokenizer.eos_token or ""

    def length(completion: str) -> int:
        text = example["prompt"] + completion
        return len(tokenizer(text if text.endswith(eos) else text + eos)["input_ids"])

    return length(example["chosen"]), length(example["rejected"])


def prepare_preference_pairs(dataset, tokenizer, max_prompt_tokens: int | None, max_length: int | None, **map_kwargs):
    """Readies `prompt`/`chosen`/`rejected` text for TRL's DPOTrainer: separates completions that would glue to
    their prompt with a space (see [`space_completions`]), ends each prompt on a word (see
    [`move_prompt_whitespace_to_completions`]), keeps the last `max_prompt_tokens` tokens of each prompt, and drops
    the pairs whose prompt + chosen or prompt + rejected exceeds `max_length` tokens, rather than truncating them."""
    dataset = dataset.map(space_completions, **map_kwargs).map(move_prompt_whitespace_to_completions, **map_kwargs)
    if max_prompt_tokens is not None:
        dataset = dataset.map(keep_last_prompt_tokens, fn_kwargs={"tokenizer": tokenizer,
                                                                  "max_prompt_tokens": max_prompt_tokens}, **map_kwargs)
    if max_length is not None:
        dataset = dataset.filter(lambda example: max(pair_token_lengths(example, tokenizer)) <= max_length,
                                 **map_kwargs)
    return dataset

