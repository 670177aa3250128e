"""The package's boundaries, read from its source: TRL's and transformers' private names are used only in
`trl_ext/trl_contract/`, and `trl_ext` imports nothing outside itself but its declared dependencies."""

import ast
import re
import sys
from pathlib import Path

import accelerate
import peft
import transformers
import trl

from trl_ext.trl_contract import PRIVATE_METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "trl_ext"
CONTRACT = PACKAGE / "trl_contract"
# Where the private names trl_ext could reach live: TRL, and the parts of transformers, accelerate and PEFT that
# hold the objects it is handed (trainers, their arguments, callbacks, accelerator, models)
THEIR_SOURCES = [
    *Path(trl.__file__).parent.rglob("*.py"),
    *(Path(transformers.__file__).parent / name for name in (
        "trainer.py", "training_args.py", "trainer_callback.py", "modeling_utils.py",
        "integrations/integration_utils.py",
    )),
    *Path(accelerate.__file__).parent.glob("*.py"),
    *Path(peft.__file__).parent.glob("*.py"),
]
# Their private methods trl_ext overrides, each checked at import (`PRIVATE_METHODS`): an override may call the original
OVERRIDDEN = {method.name for method in PRIVATE_METHODS}
# Packages `trl_ext` may import: the standard library, its dependencies and its optional extras
ALLOWED_IMPORTS = set(sys.stdlib_module_names) | {
    "trl_ext", "trl", "transformers", "peft", "accelerate", "datasets", "torch", "bitsandbytes", "safetensors",
    "packaging", "filelock", "tqdm", "huggingface_hub", "numpy", "pyarrow", "yaml", "tokenizers", "gguf", "matplotlib",
}


def their_private_names() -> set[str]:
    """Private attributes and methods their classes define: `self._x`, `cls._x`, `def _x`, and class-level `_x = `."""
    patterns = [re.compile(r"(?:\bself\.|\bcls\.|\bdef )(_[A-Za-z]\w*)"),
                re.compile(r"^[ \t]+(_[A-Za-z]\w*)[ \t]*(?::[^=\n]*)?=", re.MULTILINE)]
    names = set()
    for path in THEIR_SOURCES:
        text = path.read_text()
        names.update(name for pattern in patterns for name in pattern.findall(text) if not name.startswith("__"))
    return names


def private_names_used(tree: ast.AST) -> list[tuple[int, str]]:
    """`(line, name)` of every `x._name` and `getattr(x, "_name"...)` in `tree`, dunders and `super()._name` (the call
    of an overridden method's original) excluded."""
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            via_super = (isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                         and node.value.func.id == "super")
            name = None if via_super and node.attr in OVERRIDDEN else node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
        else:
            continue
        if name and name.startswith("_") and not name.startswith("__"):
            used.append((node.lineno, name))
    return sorted(used)


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_trl_and_transformers_private_names_are_used_only_in_the_contract():
    theirs = their_private_names()
    assert {"_metrics", "_paper", "_prepare_inputs", "_signature_columns"} <= theirs  # the scan sees them
    leaks = [f"{path.relative_to(PACKAGE.parent)}:{line} `{name}`"
             for path in package_modules() if CONTRACT not in path.parents
             for line, name in private_names_used(ast.parse(path.read_text())) if name in theirs]
    assert not leaks, "Private TRL/transformers names outside trl_ext/trl_contract/ (add a door there): " + \
        ", ".join(leaks)


def test_the_check_finds_a_private_name():
    tree = ast.parse("trainer._metrics['train']\ngetattr(trainer, '_paper')\nobject.__init__\n"
                     "super()._compute_loss(model, inputs, False)\nself._compute_loss(model, inputs, False)")
    assert private_names_used(tree) == [(1, "_metrics"), (2, "_paper"), (5, "_compute_loss")]


def test_the_package_imports_nothing_outside_itself():
    outside = []
    for path in package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            outside += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} `{root}`" for root in roots
                        if root not in ALLOWED_IMPORTS]
    assert not outside, "trl_ext imports outside itself and its dependencies: " + ", ".join(outside)
