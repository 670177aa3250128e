"""Helpers shared by the recipes: their default configs (the training helpers are in `trl_ext.scripts.common`)."""

import sys
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"


def with_default_config(argv: list[str] | None, config_name: str) -> list[str]:
    """`argv` (default: the command line) with `--config configs/<config_name>` first unless it names a config, so the
    recipe runs its published setup with no arguments and every flag still overrides the file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv or any(arg.startswith("--config=") for arg in argv):
        return argv
    return ["--config", str(CONFIGS / config_name), *argv]
