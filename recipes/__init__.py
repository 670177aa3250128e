"""The recipes: scripts run from a checkout (`python recipes/<name>.py`), with their configs and data. A package, so
tests and `trl-ext penn` import them as `recipes.<name>`."""
