"""Face similarity's embeddings (eval/identity.py): aligned 112 px crops, batching, the detector's view of
generated images, the largest face, undetected rows, the judge loader."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from idforge.data_pipeline.detect import Detector, FaceDetection
from idforge.eval.identity import cosine, embed_faces, embed_generated, load_judge
from idforge.models.face.align_torch import warp_to_template

LMS = torch.tensor([[10.0, 12], [22, 12], [16, 17], [11, 23], [21, 23]])


def _exactly(message: str) -> str:
    """A pytest.raises pattern that matches ``message`` and nothing more."""
    return f"^{re.escape(message)}$"


class Recorder(torch.nn.Module):
    """A fixed random projection of the crop to D features; records the crops it was given."""

    def __init__(self, dim: int = 6, size: int = 112, embedding_size: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3 * size * size, dim, generator=g))
        self.seen: list[torch.Tensor] = []
        if embedding_size is not None:
            self.embedding_size = embedding_size

    def forward(self, x):
        self.seen.append(x)
        return 3.0 * x.flatten(1) @ self.w  # not unit norm: embed_faces must normalise


class Scripted(Detector):
    """Returns the given detections for each image in turn; records the images it was given."""

    def __init__(self, per_image):
        self.per_image = list(per_image)
        self.images = []

    def detect(self, image, provided=None):
        self.images.append(image)
        return self.per_image[len(self.images) - 1]


def _images(n=5, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def _expected(images, lms, dim=6):
    enc = Recorder(dim)
    crops = warp_to_template(images.float(), lms.float(), out_size=112)
    return torch.nn.functional.normalize(enc(crops), dim=-1)


def test_embed_faces_aligns_112px_crops_and_normalises_each_row():
    imgs, lms = _images(), LMS.expand(5, 5, 2).clone()
    lms[1] += 2.0  # each image has its own landmarks
    enc = Recorder()
    emb = embed_faces(enc, imgs, lms)
    assert emb.shape == (5, 6) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(emb, _expected(imgs, lms), atol=1e-5)
    assert [tuple(c.shape) for c in enc.seen] == [(5, 3, 112, 112)]
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    assert not emb.requires_grad  # no autograd graph through the judge


def test_embed_faces_runs_64_images_at_a_time_by_default():
    enc = Recorder()
    emb = embed_faces(enc, _images(65), LMS.expand(65, 5, 2))
    assert [c.shape[0] for c in enc.seen] == [64, 1] and emb.shape == (65, 6)


def test_embed_faces_batches_give_the_same_rows_in_order():
    imgs, lms = _images(), LMS.expand(5, 5, 2).double()
    enc = Recorder()
    emb = embed_faces(enc, imgs.double(), lms, batch_size=2)
    assert [c.shape[0] for c in enc.seen] == [2, 2, 1]
    assert all(c.dtype == torch.float32 for c in enc.seen)
    assert torch.allclose(emb, embed_faces(Recorder(), imgs, lms.float()), atol=1e-5)
    assert torch.allclose(emb, _expected(imgs, lms), atol=1e-5)


def test_cosine_is_row_wise_and_scale_free():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([[4.0, 3.0], [0.0, 5.0], [-1.0, -1.0]])
    assert torch.allclose(cosine(a, b), torch.tensor([24 / 25, 0.0, -1.0]), atol=1e-6)
    assert torch.allclose(cosine(a, 7 * a), torch.ones(3), atol=1e-6)


def test_embed_generated_needs_a_detector_or_template_landmarks():
    with pytest.raises(ValueError, match=_exactly("embed_generated needs a detector or template landmarks")):
        embed_generated(Recorder(), _images(2))


def test_embed_generated_with_template_landmarks_counts_every_image_detected():
    imgs = _images(3)
    emb, found = embed_generated(Recorder(), imgs, template_landmarks=LMS.double())
    assert found.dtype == torch.bool and found.tolist() == [True, True, True]
    assert torch.allclose(emb, _expected(imgs, LMS.expand(3, 5, 2)), atol=1e-5)


def test_the_detector_sees_uint8_hwc_images_clamped_from_minus_one_one():
    imgs = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.25, 0.999, 1.0, 1.7]).reshape(1, 1, 2, 4).expand(2, 3, 2, 4)
    det = Scripted([[], []])
    embed_generated(Recorder(size=112), imgs, det)
    assert len(det.images) == 2
    got = det.images[0]
    assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.shape == (2, 4, 3)
    assert got[:, :, 0].ravel().tolist() == [0, 0, 64, 128, 159, 255, 255, 255]
    assert (got[:, :, 0] == got[:, :, 2]).all()


def _face(box, shift=0.0):
    return FaceDetection(box, (LMS + shift).numpy(), 0.9)


def test_the_largest_face_is_embedded_and_undetected_images_are_nan_rows():
    imgs = _images(4)
    small, large = _face([0, 0, 10, 10], shift=3.0), _face([0, 0, 30, 30], shift=-1.0)
    det = Scripted([[small, large], [], [_face([0, 0, 8, 8])], []])
    enc = Recorder()
    emb, found = embed_generated(enc, imgs, det)
    assert found.tolist() == [True, False, True, False]
    assert emb.shape == (4, 6)
    assert torch.isnan(emb[1]).all() and torch.isnan(emb[3]).all()
    assert not torch.isnan(emb[[0, 2]]).any()
    assert torch.allclose(emb[0], _expected(imgs[:1], (LMS - 1.0)[None])[0], atol=1e-5)
    assert torch.allclose(emb[2], _expected(imgs[2:3], LMS[None])[0], atol=1e-5)
    assert [c.shape[0] for c in enc.seen] == [2]  # only the detected images are embedded
    assert not emb.requires_grad


def test_no_face_anywhere_gives_nan_rows_of_the_encoders_embedding_size():
    imgs = _images(3)
    emb, found = embed_generated(Recorder(embedding_size=7), imgs, Scripted([[], [], []]))
    assert found.tolist() == [False, False, False] and emb.shape == (3, 7) and torch.isnan(emb).all()
    emb, _ = embed_generated(Recorder(), imgs, Scripted([[], [], []]))
    assert emb.shape == (3, 512) and torch.isnan(emb).all()


def test_load_judge_loads_a_face_encoder_folder_in_eval_mode(tmp_path, monkeypatch):
    from idforge.models.zoo import TinyConfig, tiny_face_encoder

    enc = tiny_face_encoder(TinyConfig(face_widths=(4, 8, 8, 8)), seed=0)
    enc.save_pretrained(tmp_path / "judge")
    monkeypatch.setenv("HOME", str(tmp_path))
    judge, name = load_judge("~/judge")
    assert name == str(tmp_path / "judge")
    assert not judge.training
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(judge(x), enc.eval()(x), atol=1e-6)


def test_images_that_carry_an_autograd_graph_are_embedded_without_one():
    imgs = _images(2).requires_grad_(True)
    emb, found = embed_generated(Recorder(), imgs * 1.0, Scripted([[_face([0, 0, 9, 9])], []]))
    assert found.tolist() == [True, False] and not emb.requires_grad
    assert torch.allclose(emb[0], _expected(imgs.detach()[:1], LMS[None])[0], atol=1e-5)
