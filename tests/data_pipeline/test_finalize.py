"""The curation finalizer and the unit stage's robustness: one finalizer, byte-identical shards for any
number of ranks, stale shards removed, per-file failures counted, config changes refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from idforge.data_pipeline import curate
from idforge.data_pipeline.curate import process_unit, run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.finalize import finalize_curation, why_nothing_accepted
from idforge.data_pipeline.job import ConfigMismatchError, CurateConfig, commit_listing, resolve_config
from idforge.data_pipeline.sources import open_source

LOOSE = FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None)


def _kw(src, out, **extra):
    return {
        "input": str(src),
        "output": str(out),
        "resolution": 32,
        "unit_size": 5,
        "embedder": None,
        "filters": LOOSE,
        **extra,
    }


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _units_only(cfg: CurateConfig) -> None:
    """Run every unit without finalizing."""
    items = open_source(cfg.input)
    cfg = resolve_config(cfg, items)
    items = commit_listing(cfg, items)
    for u in range(-(-len(items) // cfg.unit_size)):
        process_unit(cfg, u, items)


def test_one_rank_and_three_ranks_write_byte_identical_shards(synthid_folder, tmp_path):
    one = run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "one")))
    for rank in (2, 1):
        assert (
            run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "three"), rank=rank, world_size=3))
            is None
        )
    three = run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "three"), rank=0, world_size=3))
    assert one["shards"] == three["shards"] == ["heldout-000000.tar", "train-000000.tar"]
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "three")


FINALIZE = textwrap.dedent("""
    import sys
    from idforge.data_pipeline.job import CurateConfig
    from idforge.data_pipeline.filters import FilterConfig
    from idforge.data_pipeline.finalize import finalize_curation
    cfg = CurateConfig(input=sys.argv[1], output=sys.argv[2], resolution=32, unit_size=5, embedder=None,
                       groups_per_shard=2,
                       filters=FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None))
    print(finalize_curation(cfg)["shards"])
""")


def test_two_concurrent_finalizers_write_one_set_of_shards(synthid_folder, tmp_path):
    ref = run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "ref"), groups_per_shard=2))
    out = tmp_path / "o"
    (out).mkdir()
    (out / "train-000099.tar").write_bytes(b"stale")  # from an earlier, larger run
    _units_only(CurateConfig(**_kw(synthid_folder, out), groups_per_shard=2))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FINALIZE, str(synthid_folder), str(out)], stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert results[0] == results[1]
    assert len(ref["shards"]) == 3  # 4 train groups / 2 + 2 heldout groups / 2
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")  # the stale shard is gone
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_rerun_with_a_complete_manifest_is_a_no_op(synthid_folder, tmp_path):
    cfg = CurateConfig(**_kw(synthid_folder, tmp_path / "o"))
    run_curation(cfg)
    manifest = tmp_path / "o" / "manifest.json"
    before = (
        manifest.stat().st_mtime_ns,
        {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("*.tar")},
    )
    assert finalize_curation(cfg)["images_accepted"] == 24
    after = (
        manifest.stat().st_mtime_ns,
        {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("*.tar")},
    )
    assert before == after


def test_a_changed_config_is_refused_instead_of_mixing_units(synthid_folder, tmp_path):
    run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "o")))
    with pytest.raises(ConfigMismatchError, match=r"resolution \(32 -> 48\)"):
        run_curation(CurateConfig(**{**_kw(synthid_folder, tmp_path / "o"), "resolution": 48}))


def test_failing_files_are_counted_and_the_rest_accepted(synthid_folder, tmp_path, monkeypatch):
    items = open_source(synthid_folder)
    bad_read, bad_detect = items[3].key, items[7].key

    def stale_handle():
        raise OSError(116, "Stale file handle")

    real_open = curate.open_source

    def patched(*a, **k):
        got = real_open(*a, **k)
        for it in got:
            if it.key == bad_read:
                it.read = stale_handle
            if it.key == bad_detect:
                it.meta = {**it.meta, "landmarks": [[0, 0]] * 3}  # the detector raises ValueError
        return got

    monkeypatch.setattr(curate, "open_source", patched)
    m = run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "o"), detector="landmarks"))
    assert m["rejected"] == {"error:ValueError": 1, "read_error": 1}
    assert m["images_accepted"] == 22
    assert m["files_seen"] == m["images_accepted"] + sum(m["rejected"].values())
    logs = "".join(p.read_text() for p in (tmp_path / "o" / "_units").glob("unit-*/log.txt"))
    assert f"{bad_read}\tread_error\t" in logs and f"{bad_detect}\terror:ValueError\t" in logs


def test_heldout_identities_go_to_heldout_shards(synthid_folder, tmp_path):
    m = run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "o"), heldout=1))
    assert m["identities"] == {"heldout": 3, "train": 3}  # SynthID's 2 + 1 moved from train
    assert len(m["heldout_identities"]) == 1
    import webdataset as wds

    keys = {
        s["__key__"] for s in wds.WebDataset(str(tmp_path / "o" / "heldout-000000.tar"), shardshuffle=False)
    }
    assert m["heldout_identities"][0] in keys


def test_output_may_not_be_the_input(synthid_folder):
    with pytest.raises(ValueError, match="output folder is the input folder"):
        CurateConfig(input=str(synthid_folder), output=str(synthid_folder))


def test_paths_expand_user_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA", str(tmp_path / "d"))
    cfg = CurateConfig(input="$DATA/in", output="~/out", occlusion_model="ViT-B-32@~/w.bin", embedder=None)
    assert (cfg.input, cfg.output) == (str(tmp_path / "d" / "in"), str(tmp_path / "out"))
    assert cfg.occlusion_model == f"ViT-B-32@{tmp_path}/w.bin"


def test_slurm_array_ids_are_offset_by_the_minimum(monkeypatch, tmp_path):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    cfg = CurateConfig(input=".", output=str(tmp_path), embedder=None)
    assert (cfg.rank, cfg.world_size) == (2, 4)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    cfg = CurateConfig(input=".", output=str(tmp_path), embedder=None)
    assert (cfg.rank, cfg.world_size) == (5, 8)


def test_an_empty_run_says_why(synthid_folder, tmp_path):
    m = run_curation(
        CurateConfig(
            **{
                **_kw(synthid_folder, tmp_path / "o"),
                "filters": FilterConfig(min_resolution=16, min_face_px=500),
            }
        )
    )
    assert m["images_accepted"] == 0
    why = why_nothing_accepted(m)
    assert why == m["why_nothing_accepted"]
    assert "24 of 24 files were rejected as 'face_size'" in why and "min_face_px" in why
    assert why_nothing_accepted({"images_accepted": 3}) is None


def test_images_without_identity_take_their_full_key(tmp_path):
    from idforge.data_pipeline.synthid import SynthIDConfig, write_synthid_folder

    src = write_synthid_folder(
        SynthIDConfig(num_identities=1, images_per_identity=1, resolution=64, heldout_identities=0, seed=3),
        tmp_path / "s",
    )
    rec = json.loads((src / "landmarks.jsonl").read_text().splitlines()[0])
    root = tmp_path / "in"
    lines = []
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        (root / folder / "0001.png").write_bytes((src / rec["file"]).read_bytes())
        lines.append(json.dumps({"file": f"{folder}/0001.png", "landmarks": rec["landmarks"]}))
    (root / "landmarks.jsonl").write_text("\n".join(lines))
    m = run_curation(CurateConfig(**_kw(root, tmp_path / "o")))
    assert m["identities"] == {"train": 2}


def test_refinalizing_into_fewer_shards_removes_the_earlier_runs_extra_shards(synthid_folder, tmp_path):
    many = run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "o"), groups_per_shard=1))
    assert len(many["shards"]) == 6  # 4 train + 2 held-out groups, one per shard
    few = finalize_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "o"), groups_per_shard=4))
    assert few["shards"] == ["heldout-000000.tar", "train-000000.tar"]
    assert sorted(p.name for p in (tmp_path / "o").glob("*.tar")) == few["shards"]
    fresh = run_curation(CurateConfig(**_kw(synthid_folder, tmp_path / "fresh"), groups_per_shard=4))
    assert fresh["shards"] == few["shards"]
    assert _shard_bytes(tmp_path / "o") == _shard_bytes(tmp_path / "fresh")
