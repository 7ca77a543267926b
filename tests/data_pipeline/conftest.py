"""Fixtures for curation tests: a small SynthID folder and a trained-free tiny face encoder."""

from __future__ import annotations

import pytest
import torch
from idforge.data_pipeline.synthid import SynthIDConfig, write_synthid_folder


@pytest.fixture(scope="session")
def synthid_folder(tmp_path_factory):
    cfg = SynthIDConfig(num_identities=6, images_per_identity=4, resolution=64, heldout_identities=2, seed=1)
    return write_synthid_folder(cfg, tmp_path_factory.mktemp("synthid"))


@pytest.fixture(scope="session")
def tiny_face_encoder(tmp_path_factory):
    from idforge.models.face.face_encoder import FaceEncoder
    from idforge.models.face.iresnet import IResNet, IResNetConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("face")
    FaceEncoder(IResNet(IResNetConfig(layers=(1, 1, 1, 1), widths=(4, 8, 8, 8)))).save_pretrained(folder)
    return str(folder)
