"""The recipes: scripts run from a checkout (`python recipes/<name>.py`), with their configs and data. A package, so
tests and `trl-ext penn` import them as `recipes.<name>`."""

# Before any recipe imports peft, which imports bitsandbytes: trl_ext imports it first, dropping its CPU-kernel notice
# (`trl_ext.quiet_imports`). A recipe run as a file gets here first through `_package`.
import trl_ext  # noqa: F401
