"""Every shipped training YAML parses against the trainer's constructor signatures."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_train_config_parses(path):
    from idforge.launch.train_cmd import parse_train_config

    fit = parse_train_config(["--config", str(path)])
    gen = fit.model.generator
    if gen.conditioning != "referencenet":
        assert gen.adapter["variant"] in {"final", "joint", "arcface", "clip", "decoupled"}
    if gen.conditioning != "adapter":  # ReferenceNet generators read identity groups
        assert fit.data.mode == "group" and gen.reference["placement"] in {"decoder", "encoder", "both"}
    assert fit.data.resolution > 0


def test_every_real_config_has_a_tiny_twin():
    names = {p.stem for p in CONFIGS}
    assert "tiny" in names
    for real in (n for n in names if n.startswith("sd15_")):
        twin = (
            "tiny" if real == "sd15_diffid" else "tiny_" + real.removeprefix("sd15_").removeprefix("diffid_")
        )
        assert twin in names, f"configs/train/{real}.yaml has no tiny twin {twin}.yaml"


CURATE = sorted((Path(__file__).resolve().parents[1] / "configs" / "curate").glob("*.yaml"))


@pytest.mark.parametrize("path", CURATE, ids=[p.name for p in CURATE])
def test_curate_config_maps_onto_curate_config(path, tmp_path):
    import yaml
    from idforge.data_pipeline.job import CurateConfig

    cfg = CurateConfig(input=".", output=str(tmp_path), **yaml.safe_load(path.read_text()))
    assert cfg.resolution >= 16 and cfg.filters.multiple_faces in ("reject", "largest")
