from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    readme_commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert len(readme_commands) == 2  # the main job and the tests, nothing else
    assert ci_command == readme_commands[1]
    assert readme_commands[1].endswith("python -m pytest")
    assert readme_commands[0].endswith("python recipes/penn_experiment.py")  # the main job


def test_newest_trl_script_is_valid_bash():
    """`tools/test_newest_trl.sh` (documented in the README) installs from PyPI, so the suite only checks its syntax."""
    import subprocess

    assert "bash tools/test_newest_trl.sh" in (ROOT / "README.md").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "tools/test_newest_trl.sh")], check=True)
