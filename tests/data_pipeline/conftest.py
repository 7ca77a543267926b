"""Fixtures for curation tests: a small SynthID folder and a trained-free tiny face encoder."""

from __future__ import annotations

import pytest
from idforge.data_pipeline.synthid import SynthIDConfig, write_synthid_folder


@pytest.fixture(scope="session")
def synthid_folder(tmp_path_factory):
    cfg = SynthIDConfig(num_identities=6, images_per_identity=4, resolution=64, heldout_identities=2, seed=1)
    return write_synthid_folder(cfg, tmp_path_factory.mktemp("synthid"))


@pytest.fixture(scope="session")
def tiny_face_encoder(tmp_path_factory):
    from idforge.models.zoo import TinyConfig, tiny_face_encoder

    folder = tmp_path_factory.mktemp("face")
    tiny_face_encoder(TinyConfig(face_widths=(4, 8, 8, 8)), seed=0).save_pretrained(folder)
    return str(folder)
