"""Every shipped training YAML parses against the trainer's constructor signatures."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_train_config_parses(path):
    from idforge.launch.train_cmd import parse_train_config

    fit = parse_train_config(["--config", str(path)])
    assert fit.model.generator.adapter["variant"] in {"final", "joint", "arcface", "clip", "decoupled"}
    assert fit.data.resolution > 0


def test_every_real_config_has_a_tiny_twin():
    names = {p.stem for p in CONFIGS}
    assert "tiny" in names
    assert len(CONFIGS) >= 2


CURATE = sorted((Path(__file__).resolve().parents[1] / "configs" / "curate").glob("*.yaml"))


@pytest.mark.parametrize("path", CURATE, ids=[p.name for p in CURATE])
def test_curate_config_maps_onto_curate_config(path, tmp_path):
    import yaml
    from idforge.data_pipeline.job import CurateConfig

    cfg = CurateConfig(input=".", output=str(tmp_path), **yaml.safe_load(path.read_text()))
    assert cfg.resolution >= 16 and cfg.filters.multiple_faces in ("reject", "largest")
