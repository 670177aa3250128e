"""Every documented command is run by a test, so a documented command cannot silently break.

The commands are read from the ```bash blocks of README.md and benchmarks/README.md and of the docstrings of
recipes/ (its packages too) and benchmarks/*.py. Each one that runs a repository script (`python X.py ...`,
`accelerate launch [launcher options] X.py ...`) or the command line (`trl-ext ...`, `python -m trl_ext.cli ...`,
`accelerate launch [launcher options] -m trl_ext.cli ...`) is parsed as it would be run: accelerate's launcher options
by accelerate's own parser (a `--config_file` must exist and load), then the script's arguments by the script's
`parse_args`, which returns what its `__main__` passes to `main` (default `--config` included). Parsing loads no
model and no data. A few cheap commands also run for real (`e2e`), and so do the README's ```python examples.
"""

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import transformers.training_args
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from trl_ext import cli

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN_FILES = ("README.md", "benchmarks/README.md")
DOCUMENTED_SCRIPTS = (
    "recipes/dpo.py", "recipes/sft.py", "recipes/llama2_sft.py", "recipes/llama2_dpo.py", "recipes/merge_adapter.py",
    "recipes/penn_experiment.py", "recipes/penn_data.py", "benchmarks/run.py", "benchmarks/gpu_suite.py",
)
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# transformers refuses `bf16=True` where bf16 is not supported (TrainingArguments.__post_init__)
BF16_REFUSED = "Your setup doesn't support bf16/gpu"


@dataclass
class Command:
    """One documented shell command: where it is, its text as written (continuations joined), the environment it
    sets (`NAME=value` prefixes) and its words after variable expansion."""

    where: str
    text: str
    words: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def documented_files() -> list[Path]:
    return [ROOT / name for name in MARKDOWN_FILES] + sorted((ROOT / "recipes").rglob("*.py")) + sorted(
        (ROOT / "benchmarks").glob("*.py"))


def bash_blocks(path: Path) -> list[list[tuple[int, str]]]:
    """The ```bash blocks of a Markdown file or of the docstrings of a Python file, as (line number, line) lists."""
    blocks, block = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if block is None and stripped == "```bash":
            block = []
        elif block is not None and stripped == "```":
            blocks.append(block)
            block = None
        elif block is not None:
            block.append((number, line))
    assert block is None, f"{path}: unclosed ```bash block"
    return blocks


def expand(text: str, variables: dict[str, str], where: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"{where}: ${name} is not assigned earlier in its block"
        return variables[name]

    return VARIABLE.sub(value, text)


def block_commands(where_file: str, block: list[tuple[int, str]]) -> list[Command]:
    """The commands of one bash block: `\\` continuations joined, comments dropped, `&&` chains split, `NAME=value`
    lines assigned (and expanded in later lines, as the shell would), `NAME=value` prefixes moved to `env`."""
    logical, pending = [], None
    for number, line in block:
        start, text = (pending[0], f"{pending[1]} {line.strip()}") if pending else (number, line.strip())
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        logical.append((start, text))
    assert pending is None, f"{where_file}: the block ends in a `\\` continuation"

    variables, commands = {}, []
    for number, text in logical:
        where = f"{where_file}:{number}"
        words = shlex.split(expand(text, variables, where), comments=True)
        assert not {"|", ";", "||", "&"} & set(words), f"{where}: only `&&` chains are understood: {text}"
        segments, segment = [], []
        for word in [*words, "&&"]:
            if word == "&&":
                segments.append(segment)
                segment = []
            else:
                segment.append(word)
        for index, segment in enumerate(segment for segment in segments if segment):
            assignments = 0
            while assignments < len(segment) and ASSIGNMENT.match(segment[assignments]):
                assignments += 1
            env = dict(word.split("=", 1) for word in segment[:assignments])
            if assignments == len(segment):  # `NAME=value` alone: a shell variable of this block
                variables.update(env)
                continue
            commands.append(Command(where if index == 0 else f"{where}#{index + 1}", text, segment[assignments:], env))
    return commands


def documented_commands() -> list[Command]:
    commands = []
    for path in documented_files():
        for block in bash_blocks(path):
            commands += block_commands(str(path.relative_to(ROOT)), block)
    return commands


def is_setup(command: Command) -> bool:
    """Environment set-up and the test command, covered by tests/test_readme.py: venv, activate, pip, pytest."""
    words = command.words
    return (words[:3] in (["python3", "-m", "venv"], ["python", "-m", "venv"])
            or words[0] in (".", "source") and words[1].endswith("bin/activate")
            or words[0] in ("pip", "pip3")
            or words[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]))


CLI = "trl-ext"


def script_invocation(command: Command):
    """`(script, script arguments, accelerate launch namespace or None)` of a command that runs a repository script
    or the command line (script `trl-ext`), else None. Launcher options are parsed by accelerate's own parser (raises
    SystemExit on a bad one)."""
    words = command.words
    if words[0] == CLI:
        return CLI, words[1:], None
    if words[0] in ("python", "python3") and words[1:3] == ["-m", "trl_ext.cli"]:
        return CLI, words[3:], None
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:], None
    if words[:2] == ["accelerate", "launch"]:
        launcher = launch_command_parser().parse_args(words[2:])
        script = CLI if launcher.module and launcher.training_script == "trl_ext.cli" else launcher.training_script
        return script, launcher.training_script_args, launcher
    return None


def script_module(script: str):
    """The module of a repository script, imported by its name as running it would (its directory is on the tests'
    path: pyproject's `pythonpath`); `trl_ext.cli` for the command line."""
    if script == CLI:
        return importlib.import_module("trl_ext.cli")
    path = (ROOT / script).resolve()
    assert path.is_file(), f"{script} does not exist"
    assert path.parent in (ROOT / "recipes", ROOT / "benchmarks"), f"{script}: not a script of recipes/ or benchmarks/"
    return importlib.import_module(path.stem)


def parse_command(command: Command):
    """Parses `command` as running it would, up to the call of `main`: the accelerate config file, the launcher
    options and the script's arguments. Returns the script's parsed arguments; raises what parsing raises. Run with
    the repository root as the working directory."""
    invocation = script_invocation(command)
    assert invocation is not None, f"{command}: not a repository script"
    script, args, launcher = invocation
    if launcher is not None and launcher.config_file:
        config_file = Path(launcher.config_file)
        assert config_file.is_file(), f"{command}: no accelerate config {config_file}"
        load_config_from_file(str(config_file))
    parse_args = getattr(script_module(script), "parse_args", None)
    assert callable(parse_args), f"{script} has no parse_args(argv)"
    return parse_args(list(args))


def parse_reporting_usage_errors(command: Command):
    """`parse_command`, turning argparse's exit into an assertion that carries its message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_command(command)
    except SystemExit as error:
        raise AssertionError(f"{command}\nexits {error.code}: {stderr.getvalue()[-2000:]}") from None


def machine_supports_bf16() -> bool:
    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def _runs_a_script(command: Command) -> bool:
    words = command.words
    return (words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py")
            or words[:2] == ["accelerate", "launch"] or words[0] == CLI
            or words[0] in ("python", "python3") and words[1:3] == ["-m", "trl_ext.cli"])


ALL_COMMANDS = documented_commands()
SCRIPT_COMMANDS = [command for command in ALL_COMMANDS if _runs_a_script(command)]


def test_every_documented_command_is_understood():
    """Each command is either environment set-up (tested elsewhere) or runs a repository script (tested here): a
    new kind of command must be added to this test, not skipped silently."""
    unknown = [str(command) for command in ALL_COMMANDS if not is_setup(command) and not _runs_a_script(command)]
    assert not unknown


@pytest.mark.parametrize("script", DOCUMENTED_SCRIPTS)
def test_every_documented_script_has_commands(script):
    """A slip in the collector cannot make the parsing test vacuous: every documented script has commands."""
    runs = [command for command in SCRIPT_COMMANDS if Path(script_invocation(command)[0]) == Path(script)]
    assert runs, f"no documented command runs {script}"


@pytest.mark.parametrize("subcommand", cli.COMMANDS)
def test_every_cli_subcommand_is_documented(subcommand):
    runs = [command for command in SCRIPT_COMMANDS if script_invocation(command)[0] == CLI
            and script_invocation(command)[1][:1] == [subcommand]]
    assert runs, f"no documented command runs `trl-ext {subcommand}`"


def test_collector_joins_expands_and_strips():
    block = [(1, 'CPU="--bf16 false --dtype float32"'), (2, 'CPU="$CPU --warmup_steps 0"  # more'),
             (3, "# a comment"), (4, "ACCELERATE_USE_CPU=true accelerate launch --cpu recipes/llama2_sft.py $CPU \\"),
             (5, "    --max_steps 2   # two steps"), (6, "python3 -m venv .venv && python recipes/dpo.py --beta 0.2")]
    commands = block_commands("X.md", block)
    assert [(command.where, command.words, command.env) for command in commands] == [
        ("X.md:4", ["accelerate", "launch", "--cpu", "recipes/llama2_sft.py", "--bf16", "false", "--dtype", "float32",
                    "--warmup_steps", "0", "--max_steps", "2"], {"ACCELERATE_USE_CPU": "true"}),
        ("X.md:6", ["python3", "-m", "venv", ".venv"], {}),
        ("X.md:6#2", ["python", "recipes/dpo.py", "--beta", "0.2"], {}),
    ]
    with pytest.raises(AssertionError, match=r"\$UNSET is not assigned"):
        block_commands("X.md", [(1, "python recipes/dpo.py $UNSET")])


@pytest.fixture
def at_root(monkeypatch):
    """Documented commands run from the repository root."""
    monkeypatch.chdir(ROOT)
    return monkeypatch


@pytest.mark.parametrize("command", SCRIPT_COMMANDS, ids=[command.where for command in SCRIPT_COMMANDS])
def test_documented_command_parses(command, at_root):
    for name, value in command.env.items():
        at_root.setenv(name, value)
    try:
        parse_reporting_usage_errors(command)
    except ValueError as error:
        if BF16_REFUSED not in str(error) or machine_supports_bf16():
            raise
        # The command asks for bf16 itself (its YAML or a flag: the GPU setups), and transformers refuses it on a
        # machine without bf16; parse it as on the GPU it is documented for, where everything else still has to
        # pass. A command meant for CPU must not land here: see test_cpu_commands_parse_on_a_cpu.
        at_root.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
        parsed = parse_reporting_usage_errors(command)
        assert any(getattr(args, "bf16", None) is True for args in parsed)


def test_cpu_commands_parse_on_a_cpu(at_root):
    """The commands documented for CPU (`--cpu`, `ACCELERATE_USE_CPU`, the embedded model or its YAML) parse as they
    are on a machine without bf16, whatever this one supports: none of them relies on the GPU fallback above."""
    cpu_commands = [command for command in SCRIPT_COMMANDS if "--cpu" in command.words
                    or command.env.get("ACCELERATE_USE_CPU") == "true"
                    or "embedded:smollm2-135m-instruct" in command.words
                    or "recipes/configs/dpop_smollm2.yaml" in command.words and "--bf16" not in command.words]
    assert len(cpu_commands) >= 6
    # What transformers and trl_ext ask about the machine
    modules = [transformers.training_args, *(module for name, module in sys.modules.items()
                                             if name == "trl_ext" or name.startswith("trl_ext."))]
    for module in modules:
        for name in ("is_torch_bf16_gpu_available", "is_torch_xla_available"):
            if hasattr(module, name):
                at_root.setattr(module, name, lambda: False)
    for command in cpu_commands:
        for name, value in command.env.items():
            at_root.setenv(name, value)
        parse_reporting_usage_errors(command)


def test_the_kl_sft_command_selects_kl_sft(at_root):
    """The command that once exited with `invalid choice: 'kl_sft'`."""
    (command,) = [command for command in SCRIPT_COMMANDS if command.where.startswith("README.md")
                  and command.words[:3] == ["accelerate", "launch", "recipes/llama2_sft.py"]
                  and "kl_sft" in command.words]
    at_root.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    data_args, training_args, model_args = parse_reporting_usage_errors(command)
    assert training_args.loss_type == "kl_sft"
    assert training_args.packing and model_args.model_name_or_path == "meta-llama/Llama-2-7b-hf"  # from the YAML


@pytest.mark.parametrize(("text", "error"), [
    ("python recipes/llama2_sft.py --loss_type no_such_loss", r"Unknown `loss_type` 'no_such_loss'"),
    ("accelerate launch --cpu recipes/llama2_dpo.py --bf16 false --no_such_flag 1", r"not used .*--no_such_flag"),
    ("python recipes/dpo.py --config recipes/configs/dpop_smollm2.yaml --loss_type no_such_loss", r"no_such_loss"),
    ("python recipes/penn_experiment.py --methods sft rlhf", r"Unknown `methods` \['rlhf'\]"),
    ("python benchmarks/run.py --models huge", r"exits 2: .*invalid choice: 'huge'"),
    ("accelerate launch --no_such_launcher_flag recipes/dpo.py", r"exits 2: .*unrecognized arguments"),
], ids=["sft-loss-choice", "unknown-flag", "dpo-loss-registry", "penn-method", "benchmark-choice", "launcher-flag"])
def test_a_bad_command_fails_parsing(text, error, at_root):
    (command,) = block_commands("bad.md", [(1, text)])
    with pytest.raises((AssertionError, ValueError), match=re.compile(error, re.S)):
        parse_reporting_usage_errors(command)


def test_a_missing_accelerate_config_fails(at_root):
    (command,) = block_commands("bad.md", [(1, "accelerate launch --config_file accelerate_configs/nope.yaml "
                                              "recipes/dpo.py")])
    with pytest.raises(AssertionError, match="no accelerate config"):
        parse_reporting_usage_errors(command)


def test_parse_args_is_what_main_gets():
    """`__main__` of every documented script passes `parse_args()`'s result to `main`, directly or through
    `trl_ext.cli.run_command` (recipes/dpo.py and sft.py import both from trl_ext.scripts)."""
    for script in DOCUMENTED_SCRIPTS:
        source = (ROOT / script).read_text()
        main_block = source.split('if __name__ == "__main__":', 1)[1]
        assert ("parse_args()" in main_block and "main(" in main_block
                or "sys.exit(run_command(main, parse_args" in main_block), script


@pytest.mark.slow
def test_penn_data_command_writes_the_first_shipped_rows(tmp_path, at_root):
    """`python recipes/penn_data.py --train_size 16 --test_size 8 ...` (run for real, into a temporary directory)
    writes the first rows of the shipped files, which the full command writes: each batch of prompts is sampled from
    its own seed, so the first rows do not depend on how many follow."""
    (command,) = [command for command in SCRIPT_COMMANDS
                  if command.words[1:2] == ["recipes/penn_data.py"] and "--train_size" in command.words]
    module = script_module("recipes/penn_data.py")
    module.main(*module.parse_args([*command.words[2:], "--output_dir", str(tmp_path)]))
    sizes = {"train": int(command.words[command.words.index("--train_size") + 1]),
             "test": int(command.words[command.words.index("--test_size") + 1])}
    for split, size in sizes.items():
        shipped = (ROOT / f"recipes/data/penn/{split}.jsonl").read_text().splitlines()[:size]
        assert (tmp_path / f"{split}.jsonl").read_text().splitlines() == shipped


# Cheap documented commands run for real as written, with the extra arguments here (a short run, a temporary
# output directory) appended; they must stay documented.
REAL_RUNS = {
    "python recipes/dpo.py --config recipes/configs/dpop_smollm2.yaml --loss_type dpop_norm --dpop_lambda 5":
        ["--max_steps", "2", "--logging_steps", "1"],
    "trl-ext sft --config recipes/configs/kl_sft_smollm2.yaml --eval_gen_steps 8 --eval_gen_pattern Penn":
        ["--max_steps", "2", "--logging_steps", "1", "--eval_gen_prompts", "4"],
}
# How a test runs a documented command's program: `trl-ext` is the console script of `pip install -e .`, which this
# interpreter may lack; `python -m trl_ext.cli` is the same `main`.
PROGRAMS = {"python": [sys.executable], "python3": [sys.executable], CLI: [sys.executable, "-m", "trl_ext.cli"]}


def _documented_as(text: str) -> list[Command]:
    return [command for command in SCRIPT_COMMANDS if shlex.join(command.words) == text]


@pytest.mark.e2e
@pytest.mark.parametrize("text", list(REAL_RUNS), ids=[
    next((command.where for command in _documented_as(text)), text) for text in REAL_RUNS])
def test_cheap_documented_command_runs(text, tmp_path):
    (command,) = _documented_as(text)
    words = [*PROGRAMS.get(command.words[0], command.words[:1]), *command.words[1:]]
    result = subprocess.run([*words, *REAL_RUNS[text], "--output_dir", str(tmp_path / "out")], cwd=ROOT,
                            env={**os.environ, **command.env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def readme_python_examples() -> list[tuple[str, str]]:
    """`(README.md:line, code)` of each ```python block of the README."""
    examples, lines = [], (ROOT / "README.md").read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip() == "```python":
            end = next(index for index in range(number, len(lines)) if lines[index].strip() == "```")
            examples.append((f"README.md:{number}", "\n".join(lines[number:end]) + "\n"))
    return examples


README_EXAMPLES = readme_python_examples()


def test_readme_has_its_python_examples():
    assert len(README_EXAMPLES) == 6  # DPOP, prefix sharing, KL-SFT and IFT, your own pairwise loss, your own SFT
    # loss, the generation-eval callback
    for where, code in README_EXAMPLES:
        compile(code, where, "exec")


@pytest.mark.e2e
@pytest.mark.parametrize(("where", "code"), README_EXAMPLES, ids=[where for where, _ in README_EXAMPLES])
def test_readme_python_example_runs_offline(where, code):
    """Each README Python example, verbatim, from the repository root, offline, on this machine (a CPU in CI)."""
    output_dirs = re.findall(r'output_dir="([^"]+)"', code)
    assert output_dirs, f"{where}: the example saves nothing to check"
    start = time.time()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{where}\n{result.stderr[-4000:]}"
    for output_dir in output_dirs:
        adapter = ROOT / output_dir / "adapter_model.safetensors"
        assert adapter.exists() and adapter.stat().st_mtime >= start, f"{where}: {adapter} not written"
