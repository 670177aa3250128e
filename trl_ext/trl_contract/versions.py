"""The releases trl-ext supports: its runtime dependencies, declared once in `trl_ext/requirements.txt` (which
`pyproject.toml` reads too), and the import-time refusal of a trl or transformers outside its range."""

import os
import warnings
from importlib import metadata, resources

from packaging.requirements import Requirement
from packaging.version import Version

ALLOW_UNSUPPORTED_ENV = "TRL_EXT_ALLOW_UNSUPPORTED_TRL"
REQUIREMENTS_FILE = "requirements.txt"
# The distributions whose internals trl_ext relies on: a release outside the declared range is refused at import.
# (their installed metadata: the version a running process imports)
CHECKED_AT_IMPORT = ("trl", "transformers")

def declared_requirements() -> dict[str, Requirement]:
    """trl-ext's runtime dependencies by name, as declared once in `trl_ext/requirements.txt` (which `pyproject.toml`
    reads too): read from the package itself, so a checkout on `PYTHONPATH` needs no installed metadata."""
    lines = (line.split("#")[0].strip() for line in resources.files("trl_ext").joinpath(REQUIREMENTS_FILE)
             .read_text().splitlines())
    return {(requirement := Requirement(line)).name: requirement for line in lines if line}


def supported_trl_requirement() -> Requirement:
    """The `trl` range trl-ext supports."""
    return declared_requirements()["trl"]


def supported_ranges() -> str:
    """The declared ranges of the distributions checked at import, for error messages."""
    return ", ".join(f"`{declared_requirements()[name]}`" for name in CHECKED_AT_IMPORT)


def check_version(name: str, version: str) -> None:
    """Raises if `version` of distribution `name` is outside its declared range, unless
    `TRL_EXT_ALLOW_UNSUPPORTED_TRL=1` (then warns)."""
    requirement = declared_requirements()[name]
    if requirement.specifier.contains(Version(version), prereleases=True):
        return
    message = (
        f"trl_ext supports `{requirement}`, but {name} {version} is installed. Install a supported release "
        f"(`pip install '{requirement}'`), or set {ALLOW_UNSUPPORTED_ENV}=1 to proceed at your own risk: trl_ext "
        "relies on trl and transformers internals other releases may change (it checks what it records from TRL's "
        "forwards and raises rather than train on the wrong tensors)."
    )
    if os.environ.get(ALLOW_UNSUPPORTED_ENV) == "1":
        warnings.warn(message, stacklevel=2)
        return
    raise ImportError(message)


def check_versions() -> None:
    """Checks the installed releases of the distributions whose internals trl_ext relies on (`CHECKED_AT_IMPORT`)."""
    for name in CHECKED_AT_IMPORT:
        check_version(name, metadata.version(name))
