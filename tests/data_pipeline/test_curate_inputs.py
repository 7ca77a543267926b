"""Curation inputs: other tools' webdataset shards, real photos, rotated faces, the automatic detector."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from idforge.data_pipeline import detect
from idforge.data_pipeline.align import align_face, transform_box, transform_points
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.detect import FaceDetection, NoDetectorError, resolve_detector
from idforge.data_pipeline.filters import FilterConfig, check_face
from idforge.data_pipeline.job import CurateConfig
from idforge.data_pipeline.sources import open_source
from PIL import Image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_img2dataset_shard_is_ingested_with_its_captions(synthid_folder, tmp_path):
    recs = [json.loads(x) for x in (synthid_folder / "landmarks.jsonl").read_text().splitlines()][:3]
    shard = tmp_path / "laion" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for n, r in enumerate(recs):
            buf = io.BytesIO()
            Image.open(synthid_folder / r["file"]).convert("RGB").save(buf, format="JPEG", quality=95)
            _add(tar, f"00000{n:04d}.jpg", buf.getvalue())
            if n == 0:
                _add(tar, f"00000{n:04d}.txt", b"a caption from the txt file")
            meta = {"url": f"http://x/{n}.jpg", "caption": f"json caption {n}", "status": "success"}
            _add(tar, f"00000{n:04d}.json", json.dumps(meta).encode())
    items = open_source(shard)
    assert [it.key for it in items] == [f"00000.tar::00000{n:04d}.jpg" for n in range(3)]
    for it in items:
        it.load_meta()
    assert items[1].meta["source_meta"]["url"] == "http://x/1.jpg"
    assert [it.meta["caption"] for it in items] == [
        "a caption from the txt file",
        "json caption 1",
        "json caption 2",
    ]


def test_img2dataset_shard_through_the_job_keeps_captions(synthid_folder, tmp_path, monkeypatch):
    from idforge.data_pipeline import curate

    recs = [json.loads(x) for x in (synthid_folder / "landmarks.jsonl").read_text().splitlines()][:2]
    shard = tmp_path / "laion" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for n, r in enumerate(recs):
            _add(tar, f"k{n}.png", (synthid_folder / r["file"]).read_bytes())
            _add(tar, f"k{n}.txt", f"caption {n}".encode())
    lms = {f"00000.tar::k{n}.png": r for n, r in enumerate(recs)}

    class Known(detect.Detector):
        def detect(self, image, provided=None):
            return []

        def detect_batch(self, images, provideds=None):
            return [
                [FaceDetection(box=lms[k]["box"], landmarks=lms[k]["landmarks"], score=1.0)] for k in order
            ]

    order: list[str] = []
    real_decode = curate.decode_image

    def decode(data, name, *a):
        order.append(name)
        return real_decode(data, name, *a)

    monkeypatch.setattr(curate, "decode_image", decode)
    monkeypatch.setattr(curate, "make_detector", lambda name, **kw: Known())
    curate._STATE.clear()
    cfg = CurateConfig(
        input=str(shard),
        output=str(tmp_path / "o"),
        detector="insightface",
        embedder=None,
        resolution=32,
        detect_batch_size=64,
        filters=FilterConfig(min_resolution=16, min_face_px=4),
    )
    m = run_curation(cfg)
    curate._STATE.clear()
    assert m["images_accepted"] == 2
    import webdataset as wds

    caps = {
        im["source"]: im["caption"]
        for s in wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False)
        for im in json.loads(s["meta.json"])["images"]
    }
    assert caps == {"00000.tar::k0.png": "caption 0", "00000.tar::k1.png": "caption 1"}


def test_a_weak_false_detection_does_not_count_as_a_second_face():
    image = np.zeros((200, 200, 3), np.uint8)
    lms = [[80, 90], [120, 90], [100, 110], [85, 130], [115, 130]]
    face = FaceDetection(box=[60, 60, 140, 160], landmarks=lms, score=1.2)
    weak = FaceDetection(box=[10, 150, 50, 190], landmarks=lms, score=0.12)
    tiny = FaceDetection(box=[0, 0, 5, 5], landmarks=lms, score=0.9)
    det, reason = check_face(image, [weak, face, tiny], FilterConfig(min_det_score=0.5, min_face_px=32))
    assert reason is None and det is face
    two = FaceDetection(box=[150, 10, 195, 60], landmarks=lms, score=0.9)
    assert check_face(image, [face, two], FilterConfig(min_face_px=32))[1] == "multiple_faces"
    assert check_face(image, [weak], FilterConfig())[1] == "det_score"


@pytest.mark.dlib
def test_astronaut_photo_is_accepted_with_dlib(tmp_path):
    pytest.importorskip("dlib", reason="the dlib extra is not installed: pip install 'idforge[dlib]'")
    import skimage.data

    (tmp_path / "in").mkdir()
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "in" / "astronaut.png")
    m = run_curation(
        CurateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "o"), detector="dlib", embedder=None)
    )
    assert m["images_accepted"] == 1, m["rejected"]


@pytest.mark.dlib
def test_two_photos_of_one_person_in_a_plain_folder_form_one_identity(tmp_path):
    pytest.importorskip("dlib", reason="the dlib extra is not installed: pip install 'idforge[dlib]'")
    import os

    import insightface
    import skimage.data

    root = tmp_path / "in"
    root.mkdir()
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(root / "one.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1][40:, 30:])).resize((400, 400)).save(
        root / "two.jpg"
    )
    hanks = Image.open(os.path.join(os.path.dirname(insightface.__file__), "data/images/Tom_Hanks_54745.png"))
    hanks.convert("RGB").resize((336, 336)).save(root / "other.png")
    m = run_curation(
        CurateConfig(
            input=str(root),
            output=str(tmp_path / "o"),
            resolution=64,
            filters=FilterConfig(duplicate_threshold=None, min_resolution=64),
        )
    )  # detector auto -> dlib, embedder auto -> dlib, cluster auto
    assert m["config"]["detector"] == "dlib" and m["config"]["embedder"] == "dlib"
    assert m["images_accepted"] == 3, m["rejected"]
    assert m["identities"] == {"train": 2}
    import webdataset as wds

    samples = list(wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False))
    groups = sorted(sorted(im["source"] for im in json.loads(s["meta.json"])["images"]) for s in samples)
    assert not any("emb.npy" in s for s in samples)  # dlib's 128-d descriptors are not ArcFace inputs
    assert groups == [["one.png", "two.jpg"], ["other.png"]]


def test_a_rotated_face_box_contains_the_face():
    image = np.zeros((160, 160, 3), np.uint8)
    centre = np.array([80.0, 80.0])
    upright = np.array([[65, 70], [95, 70], [80, 85], [68, 100], [92, 100]], dtype=np.float32)
    box = np.array([50, 45, 110, 120], dtype=np.float32)
    theta = np.deg2rad(45)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lms = (upright - centre) @ rot.T + centre  # the face turned by 45 degrees
    corners = (np.array([[50, 45], [110, 45], [110, 120], [50, 120]]) - centre) @ rot.T + centre
    rotated_box = np.concatenate([corners.min(0), corners.max(0)])
    _, matrix = align_face(image, lms, size=64, scale=0.8)
    out = transform_box(rotated_box, matrix)
    face = transform_points(corners, matrix)  # the upright face's box corners, now in the crop
    assert (out[:2] <= face.min(0) + 1e-3).all() and (out[2:] >= face.max(0) - 1e-3).all()
    assert (out[2:] - out[:2]).min() > 0.5 * (box[2:] - box[:2]).min() * (64 / 160)


def test_auto_detector_without_any_backend_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(detect, "dlib_available", lambda: False)
    assert resolve_detector("auto", has_landmarks=True, root=tmp_path) == "landmarks"
    with pytest.raises(NoDetectorError) as err:
        resolve_detector("auto", has_landmarks=False, root=tmp_path)
    msg = str(err.value)
    assert "insightface model pack" in msg and "idforge[dlib]" in msg and "landmarks.jsonl" in msg
    (tmp_path / "buffalo_l").mkdir()
    (tmp_path / "buffalo_l" / "det_10g.onnx").write_bytes(b"")
    assert resolve_detector("auto", has_landmarks=False, root=tmp_path) == "insightface"
