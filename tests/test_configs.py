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


def _twin(real: str) -> str:
    return "tiny" if real == "sd15_diffid" else "tiny_" + real.removeprefix("sd15_").removeprefix("diffid_")


REALS = sorted(p.stem for p in CONFIGS if p.stem.startswith("sd15_"))

# What a tiny twin may change: component sources (tiny random weights), sizes, run length and rates,
# memory knobs, and where the data lives. Everything else (classes, conditioning, adapter and
# reference options, losses, drops, parameter groups, schedule form, data mode) must be the same.
SIZE_KEYS = {
    "model": {"zoo", "image_size", "lr", "warmup_steps", "total_steps", "gradient_checkpointing",
              "checkpoint_decoder"},
    "data": {"train_shards", "val_shards", "batch_size", "num_workers", "resolution", "shuffle_buffer"},
}  # fmt: skip
MODEL_CALLBACKS = {"idforge.train.ema.EMA"}  # callbacks that change the exported weights


def _differences(real, twin, allowed: set[str], path: str = "") -> list[str]:
    if isinstance(real, dict) and isinstance(twin, dict):
        out = [f"{path}.{k}: only in one of them" for k in sorted(set(real) ^ set(twin)) if k not in allowed]
        for k in sorted(set(real) & set(twin)):
            if k not in allowed:
                out += _differences(real[k], twin[k], allowed, f"{path}.{k}")
        return out
    if isinstance(real, list) and isinstance(twin, list):
        if len(real) != len(twin):
            return [f"{path}: {len(real)} items vs {len(twin)}"]
        return [
            d for i, (a, b) in enumerate(zip(real, twin)) for d in _differences(a, b, allowed, f"{path}[{i}]")
        ]
    return [] if real == twin else [f"{path}: {real!r} vs {twin!r}"]


def _callbacks(fit) -> dict[str, dict]:
    return {
        c["class_path"]: c.get("init_args", {})
        for c in fit.get("trainer", {}).get("callbacks") or []
        if c["class_path"] in MODEL_CALLBACKS
    }


@pytest.mark.parametrize("real", REALS)
def test_every_real_config_has_a_tiny_twin_that_mirrors_it(real):
    from idforge.launch.train_cmd import parse_train_config

    names = {p.stem for p in CONFIGS}
    twin = _twin(real)
    assert twin in names, f"configs/train/{real}.yaml has no tiny twin {twin}.yaml"
    root = CONFIGS[0].parent
    a = parse_train_config(["--config", str(root / f"{real}.yaml")]).as_dict()
    b = parse_train_config(["--config", str(root / f"{twin}.yaml")]).as_dict()
    diffs = []
    for section in ("model", "data"):
        diffs += _differences(a[section], b[section], SIZE_KEYS[section], section)
    a_cb, b_cb = _callbacks(a), _callbacks(b)
    diffs += [f"trainer.callbacks: {c} only in one of them" for c in sorted(set(a_cb) ^ set(b_cb))]
    diffs += [
        f"trainer.callbacks {c}.{k}: {a_cb[c].get(k)!r} vs {b_cb[c].get(k)!r}"
        for c in set(a_cb) & set(b_cb)
        for k in ("validate_with_ema", "every_n_steps")
        if a_cb[c].get(k) != b_cb[c].get(k)
    ]
    assert not diffs, f"{twin}.yaml does not mirror {real}.yaml:\n" + "\n".join(diffs)


CURATE = sorted((Path(__file__).resolve().parents[1] / "configs" / "curate").glob("*.yaml"))


@pytest.mark.parametrize("path", CURATE, ids=[p.name for p in CURATE])
def test_curate_config_maps_onto_curate_config(path, tmp_path):
    import yaml
    from idforge.data_pipeline.job import CurateConfig

    cfg = CurateConfig(input=".", output=str(tmp_path), **yaml.safe_load(path.read_text()))
    assert cfg.resolution >= 16 and cfg.filters.multiple_faces in ("reject", "largest")
