"""Tiny edit backbones: a random-weight SD3 folder and a folder written by `idforge export`."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from idforge.models.zoo import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "sd3")


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_zoo, tmp_path_factory):
    """An IdentityGenerator with perturbed trainable weights, written by the exporter."""
    from idforge.inference.export import export_generator

    from tests.builders import perturbed_generator

    model = perturbed_generator(tiny_zoo)
    folder = tmp_path_factory.mktemp("export") / "model"
    export_generator(model, folder, resolution=32, extra={"crop_scale": 0.8})
    return folder


def photo(seed: int = 0, size: int = 32) -> torch.Tensor:
    """A smooth random image (1, 3, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
