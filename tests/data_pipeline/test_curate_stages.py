"""The optional stages of the curation job: occlusion test, captioner, identity clustering."""

from __future__ import annotations

import json

import pytest
import webdataset as wds
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig

LOOSE = {"min_resolution": 32, "min_face_px": 8, "duplicate_threshold": None}


def _metas(out):
    return [
        json.loads(s["meta.json"])
        for url in sorted(out.glob("*.tar"))
        for s in wds.WebDataset(str(url), shardshuffle=False)
    ]


@pytest.mark.parametrize("threshold, occluded", [(0.0, 24), (1.0, 0)])
def test_occlusion_stage_rejects_flagged_images(synthid_folder, tmp_path, tiny_zoo, threshold, occluded):
    filters = FilterConfig(**LOOSE, occlusion=True, occlusion_threshold=threshold)
    cfg = CurateConfig(
        input=str(synthid_folder),
        output=str(tmp_path / "o"),
        resolution=32,
        filters=filters,
        embedder=None,
        occlusion_model=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
    )
    manifest = run_curation(cfg)
    assert manifest["rejected"].get("occluded", 0) == occluded
    assert manifest["images_accepted"] == 24 - occluded
    assert manifest["files_seen"] == manifest["images_accepted"] + sum(manifest["rejected"].values())


def test_occlusion_without_a_model_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="occlusion_model"):
        CurateConfig(input=str(tmp_path), output=str(tmp_path / "o"), filters=FilterConfig(occlusion=True))


def test_default_caption_for_images_without_one(synthid_folder, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    recs = [json.loads(x) for x in (synthid_folder / "landmarks.jsonl").read_text().splitlines()][:3]
    for r in recs:
        (src / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        (src / r["file"]).write_bytes((synthid_folder / r["file"]).read_bytes())
        r.pop("caption")
    (src / "landmarks.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    cfg = CurateConfig(
        input=str(src),
        output=str(tmp_path / "o"),
        resolution=32,
        filters=FilterConfig(**LOOSE),
        embedder=None,
        captioner="provided",
        captioner_options={"default": "a face."},
    )
    run_curation(cfg)
    assert {im["caption"] for m in _metas(tmp_path / "o") for im in m["images"]} == {"a face."}


def test_unlabelled_clustering_assigns_identities_and_writes_reports(
    synthid_folder, tmp_path, tiny_face_encoder
):
    out = tmp_path / "merged"
    cfg = CurateConfig(
        input=str(synthid_folder),
        output=str(out),
        resolution=32,
        embedder=tiny_face_encoder,
        filters=FilterConfig(**LOOSE),
        cluster="unlabelled",
        cluster_options={"threshold": -1.0},
    )
    manifest = run_curation(cfg)
    # every cosine >= -1: one identity per split (train and held-out are clustered separately)
    assert manifest["identities"] == {"heldout": 1, "train": 1} and manifest["images_accepted"] == 24
    assert {m["identity"] for m in _metas(out)} == {"train-c0000000", "heldout-c0000000"}
    for split in ("train", "heldout"):
        report = json.loads((out / f"cluster_report_{split}.json").read_text())
        assert report["mode"] == "unlabelled" and report["clusters"] == 1
        assert (out / f"cluster_report_{split}.txt").is_file()
    apart = run_curation(
        CurateConfig(
            input=str(synthid_folder),
            output=str(tmp_path / "apart"),
            resolution=32,
            embedder=tiny_face_encoder,
            filters=FilterConfig(**LOOSE),
            cluster="unlabelled",
            cluster_options={"threshold": 1.0},
        )
    )
    assert sum(apart["identities"].values()) == 24  # only identical embeddings would join


def test_labelled_clustering_drops_images_far_from_the_indicator(synthid_folder, tmp_path, tiny_face_encoder):
    keep_all = run_curation(
        CurateConfig(
            input=str(synthid_folder),
            output=str(tmp_path / "a"),
            resolution=32,
            embedder=tiny_face_encoder,
            filters=FilterConfig(**LOOSE),
            cluster="labelled",
            cluster_options={"k": 1, "min_similarity": -1.0},
        )
    )
    assert keep_all["images_accepted"] == 24 and sum(keep_all["identities"].values()) == 6
    strict = run_curation(
        CurateConfig(
            input=str(synthid_folder),
            output=str(tmp_path / "b"),
            resolution=32,
            embedder=tiny_face_encoder,
            filters=FilterConfig(**LOOSE),
            cluster="labelled",
            cluster_options={"k": 1, "min_similarity": 1.0},
        )
    )
    # with k = 1 the indicator is the mean: no image of a varied person matches it exactly
    assert strict["rejected"]["cluster_outlier"] > 0
    assert strict["files_seen"] == strict["images_accepted"] + sum(strict["rejected"].values())


def test_clustering_needs_an_embedder(tmp_path):
    with pytest.raises(ValueError, match="embedder"):
        CurateConfig(input=str(tmp_path), output=str(tmp_path / "o"), cluster="unlabelled", embedder=None)


def test_detector_receives_batches(synthid_folder, tmp_path, monkeypatch):
    from idforge.data_pipeline import curate
    from idforge.data_pipeline.detect import LandmarksDetector

    sizes = []

    class Counting(LandmarksDetector):
        def detect_batch(self, images, provideds=None):
            sizes.append(len(images))
            return super().detect_batch(images, provideds)

    monkeypatch.setattr(curate, "make_detector", lambda name, **kw: Counting())
    curate._STATE.clear()
    cfg = CurateConfig(
        input=str(synthid_folder),
        output=str(tmp_path / "o"),
        resolution=32,
        unit_size=16,
        detect_batch_size=5,
        embedder=None,
        filters=FilterConfig(**LOOSE),
    )
    assert run_curation(cfg)["images_accepted"] == 24
    curate._STATE.clear()
    assert sizes == [5, 5, 5, 1, 5, 3]  # units of 16 and 8 files, cut into batches of 5
