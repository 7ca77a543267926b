"""``idforge.models``' docstring is the map of the folder: it names every file and subpackage."""

from __future__ import annotations

from pathlib import Path


def test_models_docstring_names_every_file_and_subpackage():
    from idforge import models

    folder = Path(models.__file__).parent
    entries = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
    entries |= {f"{p.name}/" for p in folder.iterdir() if (p / "__init__.py").is_file()}
    assert "face/" in entries and "zoo.py" in entries
    missing = sorted(e for e in entries if f"``{e}``" not in models.__doc__)
    assert not missing, f"{folder}/__init__.py: docstring table lacks {missing}; add a row for each"
