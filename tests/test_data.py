"""`load_dataset_any` on local JSON files: valid layouts load as `datasets` reads them, malformed ones fail with the
file and the place."""

import json
import re

import datasets
import pytest

from trl_ext.data import load_dataset_any

ROWS = [{"prompt": "Hi", "chosen": " there.", "rejected": " no."},
        {"prompt": "Bye", "chosen": " now.", "rejected": " never."}]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keeps the Arrow files `load_dataset` writes out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")


def write(tmp_path, name: str, data: str | bytes):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def load_error(path) -> str:
    with pytest.raises(ValueError) as error:
        load_dataset_any(str(path))
    message = str(error.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize("name, text", [
    ("list.json", json.dumps(ROWS, indent=2)),
    ("lines.json", "".join(json.dumps(row) + "\n" for row in ROWS)),
    # A BOM, CRLF endings and blank lines are all read by `datasets`, so they stay accepted.
    ("lines.jsonl", "\ufeff" + json.dumps(ROWS[0]) + "\r\n\n  \n" + json.dumps(ROWS[1]) + "\r\n"),
    ("one.jsonl", json.dumps(ROWS[0]) + "\n"),
])
def test_valid_json_files_load_as_datasets_reads_them(tmp_path, name, text):
    path = write(tmp_path, name, text)
    dataset = load_dataset_any(str(path))["train"]
    expected = ROWS[:1] if name == "one.jsonl" else ROWS
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert dataset.to_list() == expected
    assert dataset.to_list() == datasets.load_dataset("json", data_files=str(path))["train"].to_list()


def test_non_utf8_json_lines_names_the_byte_offset(tmp_path):
    first = json.dumps(ROWS[0]).encode() + b"\n"
    path = write(tmp_path, "latin1.jsonl", first + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    message = load_error(path)
    assert f"not valid UTF-8: byte 0xe9 at byte offset {len(first) + 15} (line 2)" in message


def test_non_utf8_json_list_names_the_byte_offset(tmp_path):
    path = write(tmp_path, "latin1.json", b'[\n{"prompt": "\xff"}]')
    assert "byte 0xff at byte offset 14 (line 2)" in load_error(path)


def test_bad_json_line_names_the_line_and_parser_message(tmp_path):
    path = write(tmp_path, "bad.jsonl", json.dumps(ROWS[0]) + '\n\n{"prompt": "a",}\n' + json.dumps(ROWS[1]))
    message = load_error(path)
    assert re.search(r", line 3: invalid JSON \(Expecting property name .* at column 16\)", message)


def test_bad_json_list_names_the_line(tmp_path):
    path = write(tmp_path, "bad.json", '[\n  {"prompt": "a"},\n  {"prompt": "b",}\n]')
    assert re.search(r", line 3: invalid JSON \(Expecting property name .* at column 18\)", load_error(path))


@pytest.mark.parametrize("text", [json.dumps({"data": ROWS, "version": 2}, indent=2),
                                  json.dumps({"data": ROWS, "version": 2})])
def test_top_level_object_names_its_keys(tmp_path, text):
    message = load_error(write(tmp_path, "wrapped.json", text))
    assert "holds a single JSON object with keys ['data', 'version']" in message
    assert "expects a list of objects or one object per line" in message


def test_pretty_printed_object_in_jsonl_names_its_keys(tmp_path):
    path = write(tmp_path, "wrapped.jsonl", json.dumps({"prompt": ["a"], "chosen": ["b"]}, indent=2))
    assert "single JSON object with keys ['prompt', 'chosen']" in load_error(path)


@pytest.mark.parametrize("name, text", [("empty.json", ""), ("blank.jsonl", "\n  \n"), ("bom.json", "\ufeff")])
def test_empty_file(tmp_path, name, text):
    assert "is empty" in load_error(write(tmp_path, name, text))


def test_empty_list(tmp_path):
    assert "holds an empty list" in load_error(write(tmp_path, "empty.json", " []"))


@pytest.mark.parametrize("items, place", [(["a", "b"], "index 0 is a string"), ([ROWS[0], 2], "index 1 is a number")])
def test_list_items_must_be_objects(tmp_path, items, place):
    assert f"the list item at {place}, not an object" in load_error(write(tmp_path, "items.json", json.dumps(items)))


@pytest.mark.parametrize("line, kind", [("null", "null"), ('"text"', "a string"), ("[1]", "a list")])
def test_json_lines_must_be_objects(tmp_path, line, kind):
    path = write(tmp_path, "rows.jsonl", json.dumps(ROWS[0]) + "\n" + line + "\n")
    assert f", line 2: expected a JSON object, got {kind}" in load_error(path)
