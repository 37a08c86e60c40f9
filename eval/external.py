"""Checks for the external models the official scorers use (Mask2Former, CLIP, mPLUG).

They are never downloaded: the user installs the package and passes local weight files.
When something is absent the error names exactly that thing and how to provide it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from cheers.errors import CheersError


class MissingModelError(CheersError):
    """An external package or local weight file that a scorer needs is absent."""


def require_module(name: str, purpose: str, install: str):
    """Import ``name`` or raise MissingModelError: '<purpose> needs <name> (<install>)'."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingModelError(
            f"{purpose} needs the Python package '{name}', which is not installed ({install})"
        ) from e


def require_file(path: str | Path | None, flag: str, what: str, *, folder: bool = False) -> Path:
    """``path`` as a Path, or MissingModelError when it was not given or does not exist."""
    if path is None or str(path) == "":
        raise MissingModelError(
            f"{what} is needed: pass its local path with {flag} (nothing is downloaded)"
        )
    p = Path(path)
    ok = p.is_dir() if folder else p.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        raise MissingModelError(f"{what} {kind} not found: {p} (given with {flag})")
    return p


__all__ = ["MissingModelError", "require_file", "require_module"]
