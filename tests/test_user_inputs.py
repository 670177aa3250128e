"""What a new user types that trl_ext refuses before training, as they would type it: the Python API on the tiny
model, the command line in-process (`trl_ext.cli.main`, its stderr and exit status). Each refusal names the field,
flag or row, what was found and the fix."""

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trl
from datasets import Dataset
from transformers import AutoTokenizer

from trl_ext import (
    DPOConfig,
    DPOTrainer,
    SFTConfig,
    SFTTrainer,
    cli,
    embedded,
    registered_dpo_losses,
    registered_sft_losses,
    resolve_model_name,
)
from trl_ext.data import load_dataset_any
from trl_ext.quiet_imports import DROPPED, without_bitsandbytes_cpu_kernel_notice
from trl_ext.trl_contract import TRL_DPO_LOSS_TYPES, TRL_SFT_LOSS_TYPES

from .conftest import make_config, preference_rows

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "recipes/data/penn_pairs_sample.jsonl")
BETA_READERS = [name for name in TRL_DPO_LOSS_TYPES + registered_dpo_losses() if name != "sft"]


def refusal(argv: list[str], capsys, command=cli.main) -> tuple[int, str]:
    """`trl-ext ARGV`'s (or `command(ARGV)`'s) exit status and its one `error:` line; fails if it printed a traceback
    or more errors."""
    status = command(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return status, errors[0]


def command(subcommand: str, model: str, dataset: str, output_dir, *flags: str) -> list[str]:
    return [subcommand, "--model_name_or_path", model, "--dataset_name", dataset, "--output_dir", str(output_dir),
            *flags]


# Case 1 and 2: beta <= 0 trained silently (the opposite preference, or nothing).
@pytest.mark.parametrize("beta", [-1.0, 0.0])
@pytest.mark.parametrize("loss_type", BETA_READERS)
def test_beta_must_be_positive_for_every_loss_that_reads_it(tmp_path, loss_type, beta):
    with pytest.raises(ValueError, match=rf"^`beta` must be > 0 for `{loss_type}`, got {beta}: it scales the "
                                         r"preference margin .* Use a positive value, e.g. 0.1"):
        make_config(DPOConfig, tmp_path, loss_type=loss_type, beta=beta)


def test_sft_alone_reads_no_beta(tmp_path):
    assert make_config(DPOConfig, tmp_path, loss_type="sft", beta=0.0).beta == 0.0
    with pytest.raises(ValueError, match=r"`beta` must be > 0 for `sigmoid`, got 0.0"):
        make_config(DPOConfig, tmp_path, loss_type=["sft", "sigmoid"], beta=0.0)


def test_trl_config_with_negative_beta_is_refused_by_the_trainer(tiny_model_dir, preference_dataset, tmp_path):
    """TRL's own config accepts it; trl_ext's trainer, a drop-in for TRL's, does not."""
    args = make_config(trl.DPOConfig, tmp_path, beta=-1.0)
    with pytest.raises(ValueError, match=r"`beta` must be > 0 for `sigmoid`, got -1.0"):
        DPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset)


def test_beta_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    status, error = refusal(command("dpo", tiny_model_dir, SAMPLE, tmp_path, "--loss_type", "dpop", "--beta", "-1"),
                            capsys)
    assert status == 2 and error.startswith("error: `beta` must be > 0 for `dpop`, got -1.0: it scales")


# Case 5 (and the other counts transformers accepts), case 11: at config construction.
@pytest.mark.parametrize("config_cls", [DPOConfig, SFTConfig])
@pytest.mark.parametrize(("field", "value", "message"), [
    ("per_device_train_batch_size", 0, r"`per_device_train_batch_size` must be an integer >= 1, got 0: set it to 1"),
    ("per_device_eval_batch_size", 0, r"`per_device_eval_batch_size` must be an integer >= 1, got 0"),
    ("gradient_accumulation_steps", 0, r"`gradient_accumulation_steps` must be an integer >= 1, got 0"),
    ("max_length", 0, r"`max_length` must be an integer >= 1 or None \(no truncation\), got 0"),
    ("learning_rate", -1e-4, r"`learning_rate` must be a finite number >= 0, got -0.0001: a negative one would climb"),
    ("learning_rate", math.nan, r"`learning_rate` must be a finite number >= 0, got nan"),
])
def test_unusable_training_fields_are_refused_at_construction(tmp_path, config_cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(config_cls, tmp_path, **{field: value})


@pytest.mark.parametrize("config_cls", [DPOConfig, SFTConfig])
def test_output_dir_that_is_a_file_is_refused(tmp_path, config_cls):
    existing = tmp_path / "model.bin"
    existing.write_text("")
    with pytest.raises(ValueError, match=rf"`output_dir` is '{re.escape(str(existing))}', an existing file: "
                                         r"checkpoints and the trained model are saved in a directory"):
        config_cls(output_dir=str(existing))


def test_batch_size_and_output_dir_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    status, error = refusal(command("dpo", tiny_model_dir, SAMPLE, tmp_path, "--per_device_train_batch_size", "0"),
                            capsys)
    assert status == 2
    assert error == "error: `per_device_train_batch_size` must be an integer >= 1, got 0: set it to 1 or more."
    existing = tmp_path / "taken"
    existing.write_text("")
    status, error = refusal(command("sft", tiny_model_dir, SAMPLE, existing), capsys)
    assert status == 2 and error.startswith(f"error: `output_dir` is '{existing}', an existing file")


# Case 3: empty completions trained with gradient norm 0.
def _rows_with_empty_completions(count: int, columns=("chosen", "rejected")) -> Dataset:
    rows = preference_rows()
    for column in columns:
        rows[column] = [""] * count + rows[column][count:]
    return Dataset.from_dict(rows)


def test_empty_completions_are_refused_when_most_rows_have_one(tiny_model_dir, tmp_path):
    dataset = _rows_with_empty_completions(16)
    with pytest.raises(ValueError, match=r"^16 of 16 rows of the train dataset have no completion to learn from: 16 "
                                         r"have an empty completion \(e.g. `chosen` of row 0\)\. That is more than "
                                         r"half of the rows, so training is refused: fill or drop the rows"):
        DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="dpop"),
                   train_dataset=dataset)
    # SFT learns a preference dataset's `chosen` as its `completion`
    with pytest.raises(ValueError, match=r"^9 of 16 rows of the train dataset have no completion to learn from: 9 "
                                         r"have an empty completion \(e.g. `completion` of row 0\)"):
        SFTTrainer(model=tiny_model_dir, args=make_config(SFTConfig, tmp_path, loss_type="kl_sft"),
                   train_dataset=_rows_with_empty_completions(9, ("chosen",)))


def test_a_few_empty_completions_are_a_warning(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_ext.data_checks"):
        DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path, loss_type="dpop"),
                   train_dataset=_rows_with_empty_completions(3, ("rejected",)))
    (warning,) = [record.getMessage() for record in caplog.records if record.name == "trl_ext.data_checks"]
    assert warning.startswith("3 of 16 rows of the train dataset have no completion to learn from: 3 have an empty "
                              "completion (e.g. `rejected` of row 0). Training goes on with the others")


def test_empty_chat_completions_are_counted(tiny_model_dir, tmp_path):
    rows = preference_rows()
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": text}] for text in rows["prompt"]],
        "chosen": [[{"role": "assistant", "content": text}] for text in rows["chosen"]],
        "rejected": [[{"role": "assistant", "content": " "}] for _ in rows["rejected"]],
    })
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match=r"16 have an empty completion \(e.g. `rejected` of row 0\)"):
        DPOTrainer(model=tiny_model_dir, args=make_config(DPOConfig, tmp_path), train_dataset=dataset,
                   processing_class=tokenizer)


# Case 4: every row dropped by truncation, then `num_samples=0`.
@pytest.mark.parametrize(("trainer_cls", "config_cls"), [(DPOTrainer, DPOConfig), (SFTTrainer, SFTConfig)])
def test_truncation_that_leaves_no_completion_is_refused(tiny_model_dir, preference_dataset, tmp_path, trainer_cls,
                                                         config_cls):
    with pytest.raises(ValueError, match=r"^16 of 16 rows of the train dataset have no completion to learn from: 16 "
                                         r"have no completion token left after truncation to `max_length=4` \(the "
                                         r"prompt alone fills it; TRL drops them\)\. .* raise `max_length` above"):
        trainer_cls(model=tiny_model_dir, args=make_config(config_cls, tmp_path, max_length=4),
                    train_dataset=preference_dataset)


# Case 6 and 7: a directory without a model, a path that does not exist.
def test_model_paths_that_are_not_models_are_refused_before_loading(preference_dataset, tmp_path, monkeypatch):
    empty = tmp_path / "my-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=rf"^`model` is '{re.escape(str(empty))}', a directory without a model: no "
                                         r"config.json \(it holds \['notes.txt'\]\)\. Give the directory "
                                         r"`save_pretrained` wrote"):
        DPOTrainer(model=str(empty), args=make_config(DPOConfig, tmp_path), train_dataset=preference_dataset)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^`model` is './no-such-model', which looks like a local path but does not "
                                         rf"exist \({re.escape(str(tmp_path))}/no-such-model, relative to the working "
                                         r"directory"):
        SFTTrainer(model="./no-such-model", args=make_config(SFTConfig, tmp_path), train_dataset=preference_dataset)
    with pytest.raises(ValueError, match=r"^`model` is 'outputs/sft/merged', which looks like a local path"):
        SFTTrainer(model="outputs/sft/merged", args=make_config(SFTConfig, tmp_path), train_dataset=preference_dataset)


@pytest.mark.parametrize("subcommand", ["dpo", "sft"])
def test_model_paths_on_the_command_line(tmp_path, capsys, subcommand):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, error = refusal(command(subcommand, str(empty), SAMPLE, tmp_path / "out"), capsys)
    assert status == 1 and error.startswith(f"error: `--model_name_or_path` is '{empty}', a directory without a "
                                            "model: no config.json (it is empty).")
    status, error = refusal(command(subcommand, str(tmp_path / "nope"), SAMPLE, tmp_path / "out"), capsys)
    assert status == 1 and error.startswith(f"error: `--model_name_or_path` is '{tmp_path / 'nope'}', which looks "
                                            "like a local path but does not exist")


# Case 8: a mistyped relative data path went to the hub.
def test_a_local_looking_dataset_path_that_does_not_exist_never_reaches_the_hub(tiny_model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, error = refusal(command("dpo", tiny_model_dir, "my_pairs.jsonl", tmp_path / "out"), capsys)
    assert status == 1 and error == (
        f"error: `--dataset_name` is 'my_pairs.jsonl', which looks like a local path but does not exist "
        f"({tmp_path}/my_pairs.jsonl, relative to the working directory {tmp_path}); it is not looked up on the hub. "
        "Give an existing file (.json, .jsonl, .csv, .parquet) or directory, or a hub dataset name such as "
        "`trl-lib/ultrafeedback_binarized`.")
    with pytest.raises(ValueError, match=r"^`name_or_path` is './data/pairs', which looks like a local path"):
        load_dataset_any("./data/pairs")


# Case 9: missing flags.
def test_missing_model_or_dataset_flag_is_named(tiny_model_dir, tmp_path, capsys):
    status, error = refusal(["dpo", "--dataset_name", SAMPLE, "--output_dir", str(tmp_path)], capsys)
    assert status == 2 and error == ("error: `--model_name_or_path` is required, as a flag or in the `--config` file: "
                                     "a hub id, a local model directory or `embedded:smollm2-135m-instruct`.")
    status, error = refusal(["sft", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path)], capsys)
    assert status == 2 and error.startswith("error: `--dataset_name` is required, as a flag or in the `--config` file")


# Case 10: an empty in-memory dataset (a bare StopIteration), None in a cell (`'NoneType' ... 'endswith'`).
@pytest.mark.parametrize(("trainer_cls", "config_cls"), [(DPOTrainer, DPOConfig), (SFTTrainer, SFTConfig)])
def test_empty_dataset_and_missing_values_are_named(tiny_model_dir, tmp_path, trainer_cls, config_cls):
    args = make_config(config_cls, tmp_path)
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match=r"^The train dataset is empty \(0 rows, columns \['prompt', 'chosen', "
                                         r"'rejected'\]\): give it at least one row"):
        trainer_cls(model=tiny_model_dir, args=args, train_dataset=empty)
    rows = preference_rows()
    rows["rejected"][3] = None
    with pytest.raises(ValueError, match=r"^The eval dataset has no value \(None\) in `rejected` at row 3: fill it or "
                                         r"drop the row, e.g. `dataset = dataset.filter\(lambda row: "
                                         r"row\['rejected'\] is not None\)`"):
        trainer_cls(model=tiny_model_dir, args=args, train_dataset=Dataset.from_dict(preference_rows()),
                    eval_dataset=Dataset.from_dict(rows))


# Case 12: every command-line error came after a ~20-line traceback.
def test_the_traceback_is_behind_debug(tmp_path, monkeypatch):
    argv = ["dpo", "--dataset_name", SAMPLE, "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="`--model_name_or_path` is required"):
        cli.main(["--debug", *argv])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="`--model_name_or_path` is required"):
        cli.main(argv)


def test_errors_outside_trl_ext_keep_their_traceback():
    """A ValueError that trl_ext's checks did not raise may be a bug: it is not shortened to one line."""
    with pytest.raises(json.JSONDecodeError):
        cli.run_command(json.loads, lambda: ("{",))


def test_a_bad_flag_value_is_one_line(capsys):
    status, error = refusal(["dpo", "--beta", "high"], capsys)
    assert status == 2 and error == "error: argument --beta: invalid float value: 'high' (`--help` lists the flags)"


def test_a_relative_config_path_says_where_it_is_read_from(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, error = refusal(["dpo", "--config", "recipes/configs/dpop_smollm2.yaml"], capsys)
    assert status == 2 and error == (
        f"error: `--config recipes/configs/dpop_smollm2.yaml`: no such file in the working directory {tmp_path}. The "
        "`recipes/` paths of trl-ext's README are relative to the root of its repository: run from a checkout's root, "
        "or give the full path.")


# Case 13: help text, the Penn experiment without matplotlib, bitsandbytes' notice.
@pytest.mark.parametrize(("subcommand", "loss_types"), [
    ("dpo", TRL_DPO_LOSS_TYPES + registered_dpo_losses()), ("sft", TRL_SFT_LOSS_TYPES + registered_sft_losses()),
])
def test_help_lists_every_loss_type_and_names_the_subcommand(capsys, subcommand, loss_types):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([subcommand, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith(f"usage: trl-ext {subcommand} [-h]")
    help_text = " ".join(out.split("--loss_type LOSS_TYPE", 2)[2].split("\n  --", 1)[0].split())
    assert set(loss_types) <= set(re.findall(r"\w+", help_text)) and "trl_ext's" in help_text


def test_penn_without_matplotlib_refuses_before_training(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`python recipes/penn_experiment.py` refuses in one line: the recipe's own check, raised in recipes/, which the
    script names as its own code to `run_command`."""
    import penn_experiment

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    output_dir = tmp_path / "penn"

    def run(argv: list[str], **own_code) -> int:
        return cli.run_command(penn_experiment.main, lambda: penn_experiment.parse_args(argv), **own_code)

    argv = ["--quick", "--methods", "sft", "--model_name_or_path", tiny_model_dir, "--output_dir", str(output_dir)]
    with pytest.raises(ImportError):  # not trl_ext's own code: a traceback
        run(argv)
    status, error = refusal(argv, capsys, lambda argv: run(argv, own_code=ROOT / "recipes"))
    assert status == 1 and error == ("error: The Penn experiment draws its plots with matplotlib, which is not "
                                     "installed: install the recipes' extras with `pip install -e "
                                     "'.[embedded,recipes]'` in the checkout.")
    assert not output_dir.exists()


def test_embedded_model_without_gguf_names_the_extra(tmp_path, monkeypatch):
    """The `[embedded]` extra: converting the embedded model (its first use) without gguf is refused, not a
    traceback through transformers."""
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModuleNotFoundError, match=r"^Converting the embedded model needs the `gguf` package, which is "
                                                  r"not installed: install trl-ext's `\[embedded\]` extra"):
        resolve_model_name("embedded:smollm2-135m-instruct")
    assert [path.suffix for path in (tmp_path / "embedded").iterdir()] == [".lock"]  # no half-converted checkpoint


def test_bitsandbytes_cpu_kernel_notice_alone_is_dropped(caplog):
    (logger_name, notice), (kernels_logger, trust_notice) = DROPPED
    with caplog.at_level(logging.WARNING), without_bitsandbytes_cpu_kernel_notice():
        logging.getLogger(logger_name).warning(notice + ": no kernel. Please make sure ...")
        logging.getLogger(kernels_logger).warning(trust_notice + " because Hugging Face Hub is in offline mode.")
        logging.getLogger(logger_name).warning("Some other bitsandbytes warning")
    logging.getLogger(logger_name).warning(notice + ": after trl_ext's imports")
    assert [record.getMessage() for record in caplog.records] == [
        "Some other bitsandbytes warning", notice + ": after trl_ext's imports"]


@pytest.mark.e2e
def test_a_recipe_script_refuses_in_one_line_without_the_bitsandbytes_notice(tmp_path):
    """`python recipes/dpo.py` as a user runs it: the refusal is the last line, with no traceback, and bitsandbytes'
    CPU-kernel notice (printed on CPUs with AVX512-BF16) is not on stderr."""
    result = subprocess.run([sys.executable, "recipes/dpo.py", "--model_name_or_path", "./no-such-model",
                             "--dataset_name", SAMPLE, "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith(
        "error: `--model_name_or_path` is './no-such-model', which looks like a local path but does not exist")
    assert not [line for _, notice in DROPPED for line in result.stderr.splitlines() if notice in line]


@pytest.mark.e2e
@pytest.mark.parametrize("script", ["recipes/penn_experiment.py", "recipes/llama2_sft.py", "recipes/llama2_dpo.py",
                                    "recipes/merge_adapter.py"])
def test_recipes_that_import_peft_print_no_bitsandbytes_notice(script):
    """These recipes import peft (hence bitsandbytes) themselves; run as files, they import trl_ext first."""
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stdout.startswith("usage: ")
    assert not [line for _, notice in DROPPED for line in result.stderr.splitlines() if notice in line]
