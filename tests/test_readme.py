import subprocess
from pathlib import Path

import pytest

from trl_ext.trl_contract import declared_requirements

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    readme_commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert len(readme_commands) == 2  # the main job and the tests, nothing else
    assert ci_command == readme_commands[1]
    assert readme_commands[1].endswith("python -m pytest")
    assert readme_commands[0].endswith("python recipes/penn_experiment.py")  # the main job


@pytest.mark.parametrize("script", ["tools/test_newest_trl.sh", "tools/test_oldest_deps.sh"])
def test_tools_scripts_are_documented_valid_bash(script):
    """The scripts in `tools/` (documented in the README) install from PyPI, so the suite only checks their syntax."""
    assert f"bash {script}" in (ROOT / "README.md").read_text()
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_oldest_deps_script_pins_each_declared_lower_bound():
    pins = subprocess.run(["bash", str(ROOT / "tools/test_oldest_deps.sh"), "--pins"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert pins == [f"{requirement.name}=={specifier.version}" for requirement in declared_requirements().values()
                    for specifier in requirement.specifier if specifier.operator == ">="]
