"""Paths as users write them: ``~`` and ``$VARS`` expanded, in the command line and in configs alike."""

from __future__ import annotations

import os
from pathlib import Path


def expand_path(value):
    """``~`` and ``$VARS`` expanded in a path (str or Path, or a list/tuple of them); the type is kept.

    Undefined variables stay as written (``os.path.expandvars``), so a later "not found" error shows
    the path the user typed.
    """
    if isinstance(value, (str, Path)):
        expanded = os.path.expandvars(os.path.expanduser(str(value)))
        return Path(expanded) if isinstance(value, Path) else expanded
    if isinstance(value, (list, tuple)):
        return type(value)(expand_path(v) for v in value)
    return value
