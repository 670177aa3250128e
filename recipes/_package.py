"""Registers this directory as the `recipes` package. A recipe run as a file (`python recipes/<name>.py`, or through
`accelerate launch`) has recipes/ itself, not the checkout, on its path; importing this module first lets it import
its siblings as `recipes.<name>`, as the tests and `trl-ext penn` do."""

import importlib.util
import sys
from pathlib import Path

if "recipes" not in sys.modules:
    _directory = Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location("recipes", _directory / "__init__.py",
                                                   submodule_search_locations=[str(_directory)])
    sys.modules["recipes"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["recipes"])
