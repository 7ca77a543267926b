"""``idforge.models.face`` holds the face-encoder modules, and they live only there."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

PUBLIC = {
    "iresnet": ["IResNet", "IResNetConfig", "load_arcface_state_dict"],
    "face_encoder": ["FaceEncoder"],
    "onnx_convert": ["onnx_to_iresnet"],
    "insightface_encoder": ["InsightFaceRecognizer", "find_recognizer"],
    "align_torch": ["warp_to_template"],
    "arcface_head": ["ArcFaceHead"],
}


def test_face_subpackage_exposes_its_modules():
    from idforge.models import face

    on_disk = {p.stem for p in Path(face.__file__).parent.glob("*.py")} - {"__init__"}
    assert set(face.__all__) == on_disk == set(PUBLIC)
    for name in face.__all__:
        assert f"``{name}``" in face.__doc__  # the docstring's table names every module
    for module, names in PUBLIC.items():
        mod = importlib.import_module(f"idforge.models.face.{module}")
        assert getattr(face, module) is mod
        for n in names:
            assert getattr(mod, n).__module__ == f"idforge.models.face.{module}"


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_old_flat_paths_are_gone(module):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"idforge.models.{module}")
