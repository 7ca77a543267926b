"""The curation job's configuration and on-disk state (data_pipeline/job.py), unit by unit: rank/world
from the environment, path expansion, the config's validation messages, the stage-1 hash, the listing
written once and checked on re-runs, atomic writes."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
from idforge.data_pipeline import job
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import ConfigMismatchError, CurateConfig
from idforge.data_pipeline.sources import SourceItem

RANK_VARS = (
    "RANK",
    "WORLD_SIZE",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_NTASKS",
    "SLURM_PROCID",
)


def _exactly(message: str) -> str:
    """A pytest.raises pattern that matches ``message`` and nothing more."""
    return f"^{re.escape(message)}$"


@pytest.fixture()
def env(monkeypatch):
    for k in RANK_VARS:
        monkeypatch.delenv(k, raising=False)

    def set_(**kw):
        for k, v in kw.items():
            monkeypatch.setenv(k, str(v))
        return job.env_rank_world()

    return set_


def _cfg(tmp_path, **kw) -> CurateConfig:
    (tmp_path / "in").mkdir(exist_ok=True)
    kw = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "rank": 0, "world_size": 1} | kw
    return CurateConfig(**kw)


def _items(*keys) -> list[SourceItem]:
    return [SourceItem(key=k, read=lambda k=k: k.encode()) for k in keys]


# ------------------------------------------------------------------------------------------ rank/world


def test_rank_world_from_torchrun_variables(env):
    assert env() == (0, 1)
    assert env(RANK=3) == (3, 1)
    assert env(RANK=3, WORLD_SIZE=8) == (3, 8)


def test_rank_world_from_a_slurm_array(env):
    # --array=0-3: ids 0..3, four tasks
    assert env(SLURM_ARRAY_TASK_ID=2, SLURM_ARRAY_TASK_MAX=3) == (2, 4)
    # --array=10-16:2 -> ids 10, 12, 14, 16: task 14 is rank 2 of 4
    got = env(
        SLURM_ARRAY_TASK_ID=14, SLURM_ARRAY_TASK_MIN=10, SLURM_ARRAY_TASK_MAX=16, SLURM_ARRAY_TASK_STEP=2
    )
    assert got == (2, 4) and all(type(v) is int for v in got)  # ranks index units: ints, not 2.0


def test_rank_world_slurm_count_wins_and_a_lone_task_is_rank_zero_of_one(env):
    assert env(SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_MAX=9, SLURM_ARRAY_TASK_COUNT=5) == (1, 5)


def test_rank_world_lone_array_task_without_max(env):
    # no SLURM_ARRAY_TASK_MAX: the task id is the last one, so task 3 of --array=0-3 is rank 3 of 4
    assert env(SLURM_ARRAY_TASK_ID=3) == (3, 4)


def test_rank_world_multiplies_array_by_tasks(env):
    assert env(SLURM_NTASKS=4, SLURM_PROCID=3) == (3, 4)
    assert env(SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_MAX=2, SLURM_NTASKS=2, SLURM_PROCID=1) == (3, 6)
    # one task: SLURM_PROCID does not change anything
    assert env(SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_MAX=2, SLURM_NTASKS=1, SLURM_PROCID=0) == (1, 3)


def test_rank_world_procid_without_ntasks_is_ignored(env):
    assert env(SLURM_PROCID=2) == (0, 1)


def test_config_takes_rank_world_from_the_environment_unless_given(env, tmp_path):
    env(RANK=1, WORLD_SIZE=3)
    (tmp_path / "in").mkdir()
    cfg = CurateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "o"))
    assert (cfg.rank, cfg.world_size) == (1, 3)
    cfg = CurateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "o"), rank=2)
    assert (cfg.rank, cfg.world_size) == (2, 3)
    cfg = CurateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "o"), world_size=5)
    assert (cfg.rank, cfg.world_size) == (1, 5)


@pytest.mark.parametrize("rank,world", [(-1, 2), (2, 2), (0, 0)])
def test_rank_outside_world_is_an_error(tmp_path, rank, world):
    with pytest.raises(ValueError, match=_exactly(f"rank {rank} is outside world_size {world}")):
        _cfg(tmp_path, rank=rank, world_size=world)


def test_last_rank_is_inside_the_world(tmp_path):
    assert _cfg(tmp_path, rank=1, world_size=2).rank == 1


# ---------------------------------------------------------------------------------------- expansion


def test_paths_and_specs_expand_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA", str(tmp_path / "d"))
    assert job._expand(None) is None
    assert job._expand("~/x") == f"{tmp_path}/x"
    assert job._expand("$DATA/y") == f"{tmp_path}/d/y"
    assert job._expand_spec(None) is None
    assert job._expand_spec("local-dir:~/clip") == f"local-dir:{tmp_path}/clip"
    assert job._expand_spec("ViT-B-32@$DATA/w.bin") == f"ViT-B-32@{tmp_path}/d/w.bin"
    assert job._expand_spec("hf-hub:org/$REPO") == "hf-hub:org/$REPO"
    assert job._expand_spec("~/plain") == f"{tmp_path}/plain"


def test_config_expands_input_output_embedder_and_occlusion_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "in").mkdir()
    cfg = CurateConfig(
        input="~/in",
        output="~/out",
        embedder="~/enc",
        occlusion_model="local-dir:~/clip",
        filters={"occlusion": True},
        rank=0,
        world_size=1,
    )
    assert (cfg.input, cfg.output, cfg.embedder) == (f"{tmp_path}/in", f"{tmp_path}/out", f"{tmp_path}/enc")
    assert cfg.occlusion_model == f"local-dir:{tmp_path}/clip"
    assert isinstance(cfg.filters, FilterConfig) and cfg.filters.occlusion
    for name in ("auto", "dlib", "none", None):
        assert _cfg(tmp_path, embedder=name).embedder == name


# --------------------------------------------------------------------------------------- validation


def test_occlusion_without_a_model_is_an_error(tmp_path):
    with pytest.raises(
        ValueError,
        match=_exactly(
            "filters.occlusion is on but occlusion_model is not set: give an open_clip spec "
            "(local-dir:/path, ARCH@/path/weights.bin) in the curation config"
        ),
    ):
        _cfg(tmp_path, filters=FilterConfig(occlusion=True))
    assert _cfg(tmp_path, filters=FilterConfig(occlusion=False)).occlusion_model is None


def test_cluster_values_and_their_embedder(tmp_path):
    for ok in (None, "auto", "labelled", "unlabelled"):
        assert _cfg(tmp_path, cluster=ok).cluster == ok
    with pytest.raises(
        ValueError, match=_exactly("cluster must be null, auto, 'labelled' or 'unlabelled', got 'all'")
    ):
        _cfg(tmp_path, cluster="all")
    for mode in ("labelled", "unlabelled"):
        for none in (None, "", "none"):
            with pytest.raises(
                ValueError,
                match=_exactly(
                    f"cluster='{mode}' needs face embeddings: set embedder (auto, a face-encoder "
                    "folder, backbone.pth, recognition .onnx or dlib)"
                ),
            ):
                _cfg(tmp_path, cluster=mode, embedder=none)
    assert _cfg(tmp_path, cluster="auto", embedder=None).cluster == "auto"


def test_device_values(tmp_path):
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert _cfg(tmp_path, device=ok).device == ok
    with pytest.raises(ValueError, match=_exactly("device must be auto, cpu or cuda[:N], got 'mps'")):
        _cfg(tmp_path, device="mps")


@pytest.mark.parametrize(
    "field,bad,good",
    [
        ("unit_size", 0, 1),
        ("resolution", 15, 16),
        ("max_group_size", 0, 1),
        ("detect_batch_size", 0, 1),
        ("decode_threads", 0, 1),
        ("heldout", -1, 0),
    ],
)
def test_size_bounds(tmp_path, field, bad, good):
    with pytest.raises(
        ValueError,
        match=_exactly(
            "unit_size, max_group_size, detect_batch_size, decode_threads must be >= 1, heldout >= 0 "
            "and resolution >= 16"
        ),
    ):
        _cfg(tmp_path, **{field: bad})
    assert getattr(_cfg(tmp_path, **{field: good}), field) == good


def test_output_inside_or_equal_to_the_input_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    for out in (tmp_path / "in", tmp_path / "in" / "sub" / "o"):
        with pytest.raises(
            ValueError,
            match=_exactly(
                f"{out}: the output folder is the input folder or inside it (its shards would be read back "
                "as input); choose an output folder outside the input"
            ),
        ):
            _cfg(tmp_path, output=str(out))
    # an input file (a tar) next to the output is fine, and so is a sibling folder
    assert _cfg(tmp_path, input=str(tmp_path / "a.tar"), output=str(tmp_path / "a")).output == str(
        tmp_path / "a"
    )
    assert _cfg(tmp_path, output=str(tmp_path / "in2")).output == str(tmp_path / "in2")


# ------------------------------------------------------------------------------------ stage-1 hash


def test_stage1_holds_exactly_the_fields_that_decide_stage_one(tmp_path):
    cfg = _cfg(tmp_path, embedder=None, filters=FilterConfig(min_sharpness=3.0, multiple_faces="largest"))
    assert cfg.stage1() == {
        "input": str(tmp_path / "in"),
        "detector": "auto",
        "embedder": None,
        "resolution": 512,
        "crop_scale": 0.8,
        "person_folders": False,
        "unit_size": 256,
        "max_pixels": job.DEFAULT_MAX_PIXELS,
        "jpeg_quality": 95,
        "filters": {
            "min_det_score": 0.5,
            "min_face_px": 32.0,
            "min_face_fraction": 0.0,
            "min_resolution": 64,
            "min_sharpness": 3.0,
            "multiple_faces": "largest",
        },
    }


def test_config_hash_is_order_free_sixteen_hex_digits_and_sees_every_value():
    h = job.config_hash({"a": 1, "b": [1, 2]})
    assert h == job.config_hash({"b": [1, 2], "a": 1})
    assert len(h) == 16 and int(h, 16) >= 0
    assert h != job.config_hash({"a": 2, "b": [1, 2]})
    assert job.config_hash({"p": Path("/x")}) == job.config_hash({"p": "/x"})


def test_resolve_device():
    import torch

    assert job.resolve_device("cpu") == "cpu"
    assert job.resolve_device("cuda:1") == "cuda:1"
    assert job.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_code_version_is_the_package_version_plus_the_short_commit():
    import subprocess

    from idforge import __version__

    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=Path(job.__file__).parent,
        capture_output=True,
        text=True,
        check=False,
    )
    commit = git.stdout.strip() if git.returncode == 0 else ""
    assert job._code_version() == (f"{__version__}+{commit}" if commit else __version__)


def test_code_version_without_git_is_the_package_version(monkeypatch):
    from idforge import __version__

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(job.subprocess, "run", no_git)
    assert job._code_version() == __version__


def test_config_defaults(tmp_path):
    cfg = _cfg(tmp_path)
    assert (cfg.detector, cfg.embedder, cfg.device, cfg.fp16) == ("auto", "auto", "auto", True)
    assert (cfg.resolution, cfg.crop_scale, cfg.person_folders, cfg.unit_size, cfg.workers) == (
        512,
        0.8,
        False,
        256,
        1,
    )
    assert (cfg.max_group_size, cfg.groups_per_shard, cfg.shard_max_bytes) == (16, 1000, 1 << 30)
    assert (cfg.jpeg_quality, cfg.detect_batch_size, cfg.decode_threads) == (95, 32, 4)
    assert cfg.filters == FilterConfig() and cfg.occlusion_model is None
    assert (cfg.captioner, cfg.captioner_options, cfg.cluster, cfg.cluster_options, cfg.heldout) == (
        "provided",
        {},
        "auto",
        {},
        0,
    )
    other = _cfg(tmp_path)
    assert (
        other.cluster_options is not cfg.cluster_options
        and other.captioner_options is not cfg.captioner_options
    )


def test_units_split_the_items_into_consecutive_ranges():
    assert job._units(7, 3) == [range(3), range(3, 6), range(6, 7)]
    assert job._units(6, 3) == [range(3), range(3, 6)]
    assert job._units(0, 3) == []


def test_tmp_suffix_names_host_and_process():
    assert job.tmp_suffix() == f"{socket.gethostname()}-{os.getpid()}"


def test_write_atomic_leaves_only_the_file(tmp_path):
    p = tmp_path / "x.bin"
    job.write_atomic(p, b"abc")
    job.write_atomic(p, b"defg")
    assert p.read_bytes() == b"defg"
    assert [q.name for q in tmp_path.iterdir()] == ["x.bin"]
    job.fsync_path(p)


def test_committed_looks_for_the_unit_marker(tmp_path):
    cfg = _cfg(tmp_path)
    assert not job._committed(cfg, 3)
    unit = Path(cfg.output) / "_units" / "unit-000003"
    unit.mkdir(parents=True)
    assert not job._committed(cfg, 3)
    (unit / "unit.json").write_text("{}")
    assert job._committed(cfg, 3) and not job._committed(cfg, 2)


# --------------------------------------------------------------------------------------- listing


def test_listing_is_written_once_and_gives_items_in_listing_order(tmp_path):
    cfg = _cfg(tmp_path, embedder=None)
    assert job.read_listing(cfg.output) is None
    out = job.commit_listing(cfg, _items("b", "a", "c"))
    assert [it.key for it in out] == ["b", "a", "c"]
    listing = job.read_listing(cfg.output)
    assert listing == {"stage1": cfg.stage1(), "hash": job.config_hash(cfg.stage1()), "keys": ["b", "a", "c"]}
    assert sorted(p.name for p in (tmp_path / "out" / "_units").iterdir()) == ["listing.json"]
    # a re-run sees the listing's order, not its own
    again = job.commit_listing(cfg, _items("c", "a", "b"))
    assert [it.key for it in again] == ["b", "a", "c"]
    assert again[0].read() == b"b"


def test_listing_keeps_its_files_new_ones_are_warned_gone_ones_fail_on_read(tmp_path, caplog):
    cfg = _cfg(tmp_path, embedder=None)
    job.commit_listing(cfg, _items("a", "b"))
    with caplog.at_level("WARNING", logger="idforge.data_pipeline.job"):
        out = job.commit_listing(cfg, _items("a", "new1", "new2"))
    listing = tmp_path / "out" / "_units" / "listing.json"
    assert [r.getMessage() for r in caplog.records] == [
        f"2 files appeared since {listing} was written; they are not curated in this output"
    ]
    assert [it.key for it in out] == ["a", "b"]
    assert out[0].read() == b"a"
    with pytest.raises(
        FileNotFoundError,
        match=_exactly(
            f"b: listed in {tmp_path / 'out' / '_units' / 'listing.json'} but no longer in {cfg.input}"
        ),
    ):
        out[1].read()
    caplog.clear()
    with caplog.at_level("WARNING", logger="idforge.data_pipeline.job"):
        job.commit_listing(cfg, _items("a", "b"))
    assert caplog.text == ""


def test_changed_stage1_config_is_a_mismatch_naming_the_changes(tmp_path):
    cfg = _cfg(tmp_path, embedder=None)
    job.commit_listing(cfg, _items("a"))
    # a stage-2 option does not matter
    job.commit_listing(_cfg(tmp_path, embedder=None, groups_per_shard=3), _items("a"))
    changed = _cfg(tmp_path, embedder=None, resolution=256, filters=FilterConfig(min_face_px=8))
    with pytest.raises(ConfigMismatchError) as e:
        job.commit_listing(changed, _items("a"))
    msg = str(e.value)
    root = tmp_path / "out" / "_units"
    assert msg == (
        f"{root / 'listing.json'}: the committed units were made with a different config (changed: "
        "filters.min_face_px (32.0 -> 8), resolution (512 -> 256)); re-run with the original config, or use "
        f"a new output folder (or delete {root})"
    )
    assert isinstance(e.value, ValueError)


def test_diff_names_nested_added_and_removed_keys():
    assert job._diff({"a": 1, "f": {"x": 1, "y": 2}}, {"a": 1, "f": {"x": 1, "y": 3}, "n": None, "z": 2}) == [
        "f.y (2 -> 3)",
        "z (None -> 2)",
    ]
    assert job._diff({"f": {"x": 1}}, {"f": 5}) == ["f ({'x': 1} -> 5)"]
    assert job._diff({}, {}) == []


def test_a_listing_written_first_by_another_rank_wins(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, embedder=None)
    root = tmp_path / "out" / "_units"
    root.mkdir(parents=True)
    real_link = os.link

    def racing_link(src, dst):  # another rank links its listing in between our check and our link
        (root / "listing.json").write_text(
            json.dumps({"stage1": cfg.stage1(), "hash": job.config_hash(cfg.stage1()), "keys": ["z", "a"]})
        )
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    out = job.commit_listing(cfg, _items("a", "z"))
    assert [it.key for it in out] == ["z", "a"]
    assert sorted(p.name for p in root.iterdir()) == ["listing.json"]


# ------------------------------------------------------------------------------------- resolution


def test_resolve_config_uses_the_committed_listing_choices(tmp_path):
    cfg = _cfg(tmp_path, embedder=None, detector="landmarks")
    job.commit_listing(cfg, _items("a"))
    rerun = _cfg(tmp_path, detector="auto", embedder="auto")
    got = job.resolve_config(rerun, items=[])
    assert (got.detector, got.embedder) == ("landmarks", None)
    assert got is not rerun and rerun.detector == "auto"
    # explicit choices are kept as given
    got = job.resolve_config(_cfg(tmp_path, detector="dlib", embedder="none"), items=[])
    assert (got.detector, got.embedder) == ("dlib", None)


def test_resolve_config_auto_detector_from_provided_landmarks(tmp_path):
    items = [SourceItem("a", read=bytes), SourceItem("b", read=bytes, meta={"landmarks": [[0, 0]] * 5})]
    got = job.resolve_config(_cfg(tmp_path, embedder=None), items=items)
    assert got.detector == "landmarks" and got.embedder is None
    assert job.resolve_config(_cfg(tmp_path, embedder=""), items=items).embedder is None


def test_resolve_config_cluster_without_embeddings_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "resolve_embedder", lambda spec: None)
    items = [SourceItem("b", read=bytes, meta={"landmarks": [[0, 0]] * 5})]
    with pytest.raises(
        ValueError,
        match=_exactly(
            "cluster='labelled' needs face embeddings but embedder=auto found none: unpack an insightface "
            "pack into ~/.insightface/models/<pack>/, pip install 'idforge[dlib]', or give a face-encoder path"
        ),
    ):
        job.resolve_config(_cfg(tmp_path, embedder="auto", cluster="labelled"), items=items)
    assert job.resolve_config(_cfg(tmp_path, embedder="auto", cluster="auto"), items=items).embedder is None
