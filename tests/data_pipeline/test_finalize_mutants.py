"""The curation finalizer's results (data_pipeline/finalize.py): the empty-run sentence, the errors before
any shard is written, group contents and order, near-duplicates on embeddings, the occlusion/caption
stage and its per-unit cache, and identity clustering's grouping."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from idforge.data_pipeline import finalize, job
from idforge.data_pipeline.cluster import ClusterResult
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.finalize import finalize_curation, why_nothing_accepted
from idforge.data_pipeline.job import CurateConfig
from PIL import Image

from tests.data_pipeline.test_finalize import _kw


def _exactly(message: str) -> str:
    """A pytest.raises pattern that matches ``message`` and nothing more."""
    return f"^{re.escape(message)}$"


def _cfg(src, out, **extra) -> CurateConfig:
    return CurateConfig(**_kw(src, out, **({"rank": 0, "world_size": 1} | extra)))


def _groups(shard: Path) -> dict[str, dict]:
    """key -> {"meta": ..., "jpgs": n, "emb": array or None} of one shard."""
    out: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            g = out.setdefault(key, {"jpgs": 0, "emb": None})
            data = tar.extractfile(m).read()
            if ext == "meta.json":
                g["meta"] = json.loads(data)
            elif ext == "emb.npy":
                g["emb"] = np.load(io.BytesIO(data))
            elif ext.endswith("jpg"):
                g["jpgs"] += 1
    return out


# ----------------------------------------------------------------------------------- the empty run


def test_why_nothing_accepted_names_the_top_reason_and_what_to_change():
    assert why_nothing_accepted({"images_accepted": 1, "rejected": {"no_face": 9}}) is None
    assert why_nothing_accepted({"images_accepted": 0, "config": {"input": "/data/x"}}) == (
        "no input files were found in /data/x; check --input"
    )

    def why(rejected, detector="dlib"):
        m = {"images_accepted": 0, "files_seen": 12, "rejected": rejected, "config": {"detector": detector}}
        return why_nothing_accepted(m)

    assert why({"resolution": 12}) == (
        "no image was accepted: 12 of 12 files were rejected as 'resolution'; "
        "lower filters.min_resolution (images are smaller than it)"
    )
    assert why({"no_face": 7, "blur": 5}) == (
        "no image was accepted: 7 of 12 files were rejected as 'no_face'; the detector (dlib) found no face: "
        "try detector insightface or dlib, or provide landmarks (landmarks.jsonl, CelebA or FFHQ annotation files)"
    )
    assert why({"read_error": 12}).endswith(
        "'read_error'; the files could not be read (permissions, a stale network mount); see _units/*/log.txt"
    )
    assert why({"error:KeyError": 12}).endswith(
        "'error:KeyError'; processing raised this exception; see _units/*/log.txt for the files and messages"
    )
    for reason in ("decode", "not_image", "empty", "decompression_bomb"):
        assert why({reason: 12}).endswith(
            f"{reason!r}; the files are not readable images (see the unit logs); check --input"
        )
    assert why({"something_new": 12}).endswith("'something_new'; see the unit logs in _units/*/log.txt")
    # ties go to the later name, so the sentence does not depend on dict order
    assert "as 'face_size'" in why({"det_score": 6, "face_size": 6})
    assert "as 'face_size'" in why({"face_size": 6, "det_score": 6})
    for reason, hint in finalize.HINTS.items():
        assert why({reason: 3}).endswith(hint.format(detector="dlib")), reason


# ---------------------------------------------------------------------------------------- errors


def test_finalize_without_units_or_with_pending_units_is_an_error(synthid_folder, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(
        FileNotFoundError,
        match=_exactly(f"{out / '_units'}: no curation units here; run the unit stage first"),
    ):
        finalize_curation(_cfg(synthid_folder, out))
    assert run_curation(_cfg(synthid_folder, out, rank=0, world_size=2)) is None  # units 0, 2, 4 of 5
    with pytest.raises(RuntimeError) as e:
        finalize_curation(_cfg(synthid_folder, out))
    assert str(e.value) == (
        f"{out / '_units'}: 2 of 5 units are not committed yet (first: 1); "
        "finalize once every worker has finished"
    )
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))


# ------------------------------------------------------------------------------------- the manifest


def test_manifest_fields(synthid_folder, tmp_path):
    cfg = _cfg(synthid_folder, tmp_path / "o", max_group_size=3)
    m = run_curation(cfg)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text()) == json.loads(json.dumps(m))
    assert m["files_seen"] == 24 and m["images_accepted"] == 24 and m["rejected"] == {}
    assert m["code_version"] == job._code_version()
    assert len(m["finalize_key"]) == 16
    assert m["config"]["output"] == str(tmp_path / "o") and m["config"]["max_group_size"] == 3
    assert m["identities"] == {"heldout": 2, "train": 4}
    assert m["groups"] == {"heldout": 4, "train": 8}
    assert m["shards"] == ["heldout-000000.tar", "train-000000.tar"]
    assert m["heldout_identities"] == [] and "why_nothing_accepted" not in m
    assert not (tmp_path / "o" / ".finalize.lock").read_bytes()


def test_groups_are_cut_at_max_group_size_and_keep_every_image(synthid_folder, tmp_path):
    run_curation(_cfg(synthid_folder, tmp_path / "o", max_group_size=3))
    train = _groups(tmp_path / "o" / "train-000000.tar")
    assert sorted(train) == [f"id{i:05d}-p{p:03d}" for i in range(4) for p in range(2)]
    for key, g in train.items():
        n = 3 if key.endswith("p000") else 1
        assert g["jpgs"] == n and len(g["meta"]["images"]) == n, key
        assert g["meta"]["identity"] == key[:7]
        for rec in g["meta"]["images"]:
            assert rec["caption"] and rec["source"].startswith(key[:7] + "/")
            assert not {"identity", "split", "labelled"} & set(rec)
    sources = [r["source"] for k in sorted(train) for r in train[k]["meta"]["images"]]
    assert len(set(sources)) == 16
    # the whole group, in input order, across its parts
    assert sources[:4] == sorted(sources[:4])


def test_a_one_image_identity_is_a_group_of_its_own_in_name_order(synthid_folder, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(synthid_folder, src)
    records = [json.loads(x) for x in (src / "landmarks.jsonl").read_text().splitlines()]
    keep = []
    for r in records:
        if r["identity"] == "id00001" and not r["file"].endswith(("0.png",)):
            (src / r["file"]).unlink()
        else:
            keep.append(r)
    (src / "landmarks.jsonl").write_text("\n".join(json.dumps(r) for r in keep) + "\n")
    m = run_curation(_cfg(src, tmp_path / "o", max_group_size=2))
    assert m["images_accepted"] == 21
    train = _groups(tmp_path / "o" / "train-000000.tar")
    assert train["id00001"]["jpgs"] == 1
    with tarfile.open(tmp_path / "o" / "train-000000.tar") as tar:
        order = list(dict.fromkeys(n.split(".")[0] for n in tar.getnames()))
    assert order == [
        "id00000-p000",
        "id00000-p001",
        "id00001",
        "id00002-p000",
        "id00002-p001",
        "id00003-p000",
        "id00003-p001",
    ]


# ------------------------------------------------------------------------------- near-duplicates


def test_near_duplicates_are_removed_within_each_identity_on_the_embeddings(
    synthid_folder, tmp_path, tiny_face_encoder
):
    filters = FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=-1.0)
    m = run_curation(_cfg(synthid_folder, tmp_path / "o", embedder=tiny_face_encoder, filters=filters))
    assert m["rejected"] == {"duplicate": 18} and m["images_accepted"] == 6  # the first image of each
    train = _groups(tmp_path / "o" / "train-000000.tar")
    assert len(train) == 4 and all(g["jpgs"] == 1 for g in train.values())
    assert all(g["emb"].shape == (1, 512) and g["emb"].dtype == np.float16 for g in train.values())
    # "auto" is the embedder's own threshold (ArcFace: 0.95); the tiny encoder's images stay apart
    auto = FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold="auto")
    m = run_curation(_cfg(synthid_folder, tmp_path / "a", embedder=tiny_face_encoder, filters=auto))
    assert m["images_accepted"] + m["rejected"].get("duplicate", 0) == 24


# ------------------------------------------------------------------------ occlusion and captions


class _Occlusion:
    def __init__(self):
        self.calls = []

    def flags(self, images):
        self.calls.append(images)
        return np.array([i == 0 for i in range(len(images))])  # the first image of each unit


class _Captioner:
    def __init__(self):
        self.calls = 0

    def caption(self, images, metas):
        self.calls += 1
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (32, 32) for im in images)
        return [f"cap {meta['source']}" for meta in metas]


def test_occlusion_and_image_captions_run_once_per_unit_and_are_cached(synthid_folder, tmp_path, monkeypatch):
    tools = {"occlusion": _Occlusion(), "captioner": _Captioner()}
    monkeypatch.setattr(finalize, "_post_tools", lambda cfg: tools)
    filters = FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None, occlusion=True)
    kw = {"captioner": "blip", "filters": filters, "occlusion_model": "local-dir:/nowhere"}
    m = run_curation(_cfg(synthid_folder, tmp_path / "o", **kw))
    assert m["rejected"] == {"occluded": 5} and m["images_accepted"] == 19  # 5 units of 5, 5, 5, 5, 4
    assert [len(c) for c in tools["occlusion"].calls] == [5, 5, 5, 5, 4]
    assert tools["captioner"].calls == 5
    posts = sorted((tmp_path / "o" / "_units").glob("unit-*/post-*.json"))
    assert [p.parent.name for p in posts] == [f"unit-{u:06d}" for u in range(5)]
    post = json.loads(posts[-1].read_text())
    assert post["rows"] == [0, 1, 2, 3] and post["occluded"] == [True, False, False, False]
    assert post["caption"][0] == "" and post["caption"][1].startswith("cap ")
    metas = [
        rec
        for shard in m["shards"]
        for g in _groups(tmp_path / "o" / shard).values()
        for rec in g["meta"]["images"]
    ]
    assert len(metas) == 19 and all(rec["caption"] == f"cap {rec['source']}" for rec in metas)
    # a re-finalize with other shard sizes reads the cached results: no tool runs again
    again = finalize_curation(_cfg(synthid_folder, tmp_path / "o", groups_per_shard=1, **kw))
    assert len(tools["occlusion"].calls) == 5 and tools["captioner"].calls == 5
    assert again["rejected"] == {"occluded": 5} and again["images_accepted"] == 19


# ---------------------------------------------------------------------------- identity clustering


def _split(n_train, n_heldout=0):
    return np.array([0] * n_train + [1] * n_heldout, dtype=np.int16), {0: "train", 1: "heldout"}


def _run_identities(cfg, split_a, split_names, name_a, name_list, emb, tmp_path, monkeypatch, result):
    calls = []

    def fake(*args, **opts):
        calls.append((args, opts))
        return result(*args)

    monkeypatch.setattr(finalize, "cluster_unlabelled", fake)
    monkeypatch.setattr(finalize, "cluster_labelled", fake)
    reports = []
    monkeypatch.setattr(finalize, "write_report", lambda res, path: reports.append(Path(path).name))
    keep = np.ones(len(split_a), dtype=bool)
    rejected: Counter = Counter()
    gid, names = finalize._identities(
        cfg, tmp_path, split_a, np.asarray(name_a), name_list, split_names, emb, keep, rejected
    )
    return [names[g] if g >= 0 else "-" for g in gid], keep, rejected, calls, reports


def _emb(n):
    return np.eye(n, 4, dtype=np.float16)


def test_unlabelled_clustering_names_clusters_per_split_and_drops_outliers(tmp_path, monkeypatch):
    cfg = SimpleNamespace(cluster="unlabelled", cluster_options={"min_size": 2}, embedder="/enc")

    def result(e):
        return ClusterResult(
            identity=np.array([0, 0, 1, -1][: len(e)]),
            keep=np.array([True, True, True, False][: len(e)]),
            report={"clusters": 2},
        )

    split_a, split_names = _split(4, 1)
    names, keep, rejected, calls, reports = _run_identities(
        cfg, split_a, split_names, [0, -1, 1, -1, -1], ["a", "b"], _emb(5), tmp_path, monkeypatch, result
    )
    assert names == ["train-c0000000", "train-c0000000", "train-c0000001", "-", "heldout-c0000000"]
    assert keep.tolist() == [True, True, True, False, True] and rejected == {"cluster_outlier": 1}
    assert [opts for _, opts in calls] == [{"min_size": 2, "threshold": 0.5}] * 2  # ArcFace's threshold
    assert calls[0][0][0].dtype == np.float32 and calls[0][0][0].shape == (4, 4)
    assert sorted(reports) == ["cluster_report_heldout", "cluster_report_train"]
    # a given threshold is kept; dlib has its own
    cfg.cluster_options = {"threshold": 0.3}
    *_, calls, _ = _run_identities(cfg, *_split(4), [-1] * 4, [], _emb(4), tmp_path, monkeypatch, result)
    assert calls[0][1] == {"threshold": 0.3}
    cfg.cluster_options, cfg.embedder = {}, "dlib"
    *_, calls, _ = _run_identities(cfg, *_split(4), [-1] * 4, [], _emb(4), tmp_path, monkeypatch, result)
    assert calls[0][1] == {"threshold": 0.92}


def test_labelled_clustering_keeps_person_names_and_gives_strays_their_own_group(tmp_path, monkeypatch):
    cfg = SimpleNamespace(cluster="labelled", cluster_options={"k": 2}, embedder="/enc")
    seen = {}

    def result(e, persons):
        seen["persons"] = persons
        # cluster ids index sorted(set(persons)) = ["\x003", "ann", "bob"]
        return ClusterResult(identity=np.array([1, 1, 2, 0]), keep=np.ones(4, bool), report={})

    names, keep, rejected, calls, _ = _run_identities(
        cfg, *_split(4), [0, 0, 1, -1], ["ann", "bob"], _emb(4), tmp_path, monkeypatch, result
    )
    assert seen["persons"] == ["ann", "ann", "bob", "\x003"]
    assert calls[0][1] == {"k": 2}
    assert names == ["ann", "ann", "bob", None]  # the unlabelled image: its own key
    assert keep.all() and rejected["cluster_outlier"] == 0


def test_auto_clusters_only_the_unlabelled_images_when_there_are_embeddings(tmp_path, monkeypatch):
    cfg = SimpleNamespace(cluster="auto", cluster_options={}, embedder="/enc")

    def result(e):
        return ClusterResult(identity=np.zeros(len(e), int), keep=np.ones(len(e), bool), report={})

    names, *_, calls, _ = _run_identities(
        cfg, *_split(4), [0, -1, 0, -1], ["ann"], _emb(4), tmp_path, monkeypatch, result
    )
    assert names == ["ann", "train-c0000000", "ann", "train-c0000000"]
    assert calls[0][0][0].shape == (2, 4)
    # every image labelled, or no embeddings: no clustering, names or own keys
    names, *_, calls, _ = _run_identities(
        cfg, *_split(3), [0, 0, 1], ["ann", "bob"], _emb(3), tmp_path, monkeypatch, result
    )
    assert names == ["ann", "ann", "bob"] and not calls
    names, *_, calls, _ = _run_identities(
        cfg, *_split(3), [0, -1, -1], ["ann"], None, tmp_path, monkeypatch, result
    )
    assert names == ["ann", None, None] and not calls


def test_no_clustering_groups_by_name_per_split(tmp_path, monkeypatch):
    cfg = SimpleNamespace(cluster=None, cluster_options={}, embedder=None)
    split_a, split_names = _split(2, 2)
    keep_names, *_ = _run_identities(
        cfg, split_a, split_names, [0, 1, 0, -1], ["ann", "bob"], None, tmp_path, monkeypatch, None
    )
    assert keep_names == ["ann", "bob", "ann", None]
    cfg.cluster = "unlabelled"
    with pytest.raises(
        RuntimeError,
        match=_exactly(
            f"clustering needs embeddings, but units in {tmp_path / '_units'} were written without an "
            "embedder: delete them and re-run with embedder set"
        ),
    ):
        _run_identities(
            cfg, split_a, split_names, [0, 1, 0, -1], ["ann", "bob"], None, tmp_path, monkeypatch, None
        )


def test_same_name_in_two_splits_is_two_groups(tmp_path, monkeypatch):
    cfg = SimpleNamespace(cluster=None, cluster_options={}, embedder=None)
    split_a, split_names = _split(2, 2)
    monkeypatch.setattr(finalize, "write_report", lambda *a: None)
    keep = np.ones(4, dtype=bool)
    gid, names = finalize._identities(
        cfg, tmp_path, split_a, np.array([0, 0, 0, 0]), ["ann"], split_names, None, keep, Counter()
    )
    assert gid[0] == gid[1] and gid[2] == gid[3] and gid[0] != gid[2]
    assert names[gid[0]] == names[gid[2]] == "ann"


# ------------------------------------------------------------------------------------ held-out


def test_heldout_moves_named_train_identities_with_two_images(tmp_path, caplog):
    cfg = SimpleNamespace(heldout=2)
    names = ["ann", "bob", None, "cy"]
    gid = np.array([0, 0, 1, 1, 2, 3])  # cy has one image, the own-key group is unnamed
    keep = np.ones(6, dtype=bool)
    split_a = np.zeros(6, dtype=np.int16)
    splits = {"train": 0}
    with caplog.at_level("WARNING", logger="idforge.data_pipeline.finalize"):
        held = finalize._heldout(cfg, gid, keep, split_a, splits, names)
    assert held == {"ann", "bob"} and splits == {"train": 0, "heldout": 1}
    assert split_a.tolist() == [1, 1, 1, 1, 0, 0] and not caplog.text
    cfg.heldout = 3
    split_a[:] = 0
    with caplog.at_level("WARNING", logger="idforge.data_pipeline.finalize"):
        assert finalize._heldout(cfg, gid, keep, split_a, {"train": 0}, names) == {"ann", "bob"}
    assert [r.getMessage() for r in caplog.records] == [
        "heldout=3 but only 2 train identities have >= 2 images"
    ]
    assert finalize._heldout(SimpleNamespace(heldout=0), gid, keep, split_a, {"train": 0}, names) == set()
    assert finalize._heldout(cfg, gid, keep, split_a, {"test": 0}, names) == set()


def test_group_names_hold_one_entry_per_identity_not_per_image(tmp_path):
    """Every image of a named person maps to one group; the name list grows with identities only
    (its arrays are sized by it at FlashFace scale)."""
    cfg = SimpleNamespace(cluster=None, cluster_options={}, embedder="/enc")
    split_a, split_names = _split(6)
    keep = np.ones(6, dtype=bool)
    gid, group_names = finalize._identities(
        cfg,
        tmp_path,
        split_a,
        np.array([0, 0, 0, 1, 1, 0]),
        ["ann", "bob"],
        split_names,
        None,
        keep,
        Counter(),
    )
    assert group_names == ["ann", "bob"]
    assert gid.tolist() == [0, 0, 0, 1, 1, 0]
