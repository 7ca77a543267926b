"""The differentiable torch warp matches OpenCV's and skimage's, and passes gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from idforge.data_pipeline.align import ARCFACE_TEMPLATE, align_face, estimate_similarity, transform_points
from idforge.models.face.align_torch import (
    ARCFACE_TEMPLATE_112,
    estimate_similarity_torch,
    template_matrix,
    warp_affine,
    warp_to_template,
)


def _landmarks(seed, noise=0.0):
    """ArcFace template moved by a random similarity (plus optional per-point noise) into a 256 image."""
    rng = np.random.default_rng(seed)
    a, s = rng.uniform(-0.5, 0.5), rng.uniform(0.8, 1.2)
    m = np.array(
        [
            [s * math.cos(a), -s * math.sin(a), rng.uniform(60, 80)],
            [s * math.sin(a), s * math.cos(a), rng.uniform(60, 80)],
        ]
    )
    return transform_points(ARCFACE_TEMPLATE, m) + rng.normal(0, noise, (5, 2)).astype(np.float32)


def _smooth_image(seed=0, size=256):
    import cv2

    base = np.random.default_rng(seed).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    return cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)


def test_similarity_matches_numpy_and_skimage_umeyama_on_noisy_points():
    from skimage.transform import SimilarityTransform

    src = np.stack([_landmarks(i, noise=2.0) for i in range(4)])
    got = estimate_similarity_torch(torch.tensor(src), ARCFACE_TEMPLATE_112)
    assert got.shape == (4, 2, 3)
    for i in range(4):
        ref = (
            SimilarityTransform.from_estimate(src[i], ARCFACE_TEMPLATE)
            if hasattr(SimilarityTransform, "from_estimate")
            else None
        )
        if ref is None:
            ref = SimilarityTransform()
            ref.estimate(src[i], ARCFACE_TEMPLATE)
        assert np.allclose(got[i].numpy(), ref.params[:2], atol=1e-4)
        assert np.allclose(got[i].numpy(), estimate_similarity(src[i], ARCFACE_TEMPLATE), atol=1e-4)


def test_similarity_never_reflects_mirrored_landmarks():
    src = torch.tensor(_landmarks(3))[None]
    mirrored = src * torch.tensor([-1.0, 1.0])  # a reflection would fit exactly; a similarity cannot
    m = estimate_similarity_torch(mirrored, ARCFACE_TEMPLATE_112)
    assert torch.linalg.det(m[:, :, :2]).item() > 0


def test_per_sample_templates_are_accepted():
    src = torch.tensor(np.stack([_landmarks(i) for i in range(2)]))
    dst = torch.stack([ARCFACE_TEMPLATE_112, ARCFACE_TEMPLATE_112 * 2])
    m = estimate_similarity_torch(src, dst)
    mapped = src @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
    assert torch.allclose(mapped, dst, atol=1e-3)


@pytest.mark.parametrize("padding,border", [("border", "replicate"), ("zeros", "constant")])
def test_warp_matches_cv2_warp_affine_including_outside_pixels(padding, border):
    img = _smooth_image()
    # landmarks near the corner so part of the crop falls outside the image and padding matters
    lms = np.stack([_landmarks(0), _landmarks(1) - 90.0])
    ref = np.stack([align_face(img, lm, 112, border=border)[0] for lm in lms]).astype(np.float32)
    x = torch.tensor(img).permute(2, 0, 1).float()[None].expand(2, -1, -1, -1)
    got = warp_to_template(x, torch.tensor(lms), 112, padding_mode=padding).permute(0, 2, 3, 1).numpy()
    if padding == "zeros":
        assert (ref[1] == 0).all(-1).mean() > 0.05  # the second crop does reach outside the image
    diff = np.abs(got - ref)
    assert diff.mean() < 0.4 and diff.max() < 1.0  # cv2 rounds to uint8 (and uses 5-bit weights)


def test_warp_affine_with_an_arbitrary_matrix_matches_cv2_for_rectangular_output():
    import cv2

    img = _smooth_image(1, 200)[:150]  # (150, 200, 3): non-square input
    m = np.array([[0.7, -0.2, 20.0], [0.25, 0.8, -5.0]])
    ref = cv2.warpAffine(img, m, (96, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    x = torch.tensor(img).permute(2, 0, 1).float()[None]
    got = warp_affine(x, torch.tensor(m, dtype=torch.float32)[None], (64, 96)).permute(0, 2, 3, 1)[0].numpy()
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 0.6


def test_template_landmarks_give_identity_and_batch_elements_are_independent():
    x = torch.rand(2, 3, 112, 112, requires_grad=True)
    out = warp_to_template(x, ARCFACE_TEMPLATE_112.expand(2, 5, 2), 112)
    assert torch.allclose(out, x, atol=1e-4)
    out[0].sum().backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() == 0


def test_out_size_scales_the_template():
    x = torch.rand(1, 3, 224, 224)
    lms = (ARCFACE_TEMPLATE_112 * 2)[None]
    assert torch.allclose(warp_to_template(x, lms, 224), x, atol=1e-4)
    assert torch.allclose(template_matrix(lms, 112)[0, :, :2], torch.eye(2) * 0.5, atol=1e-5)


def test_gradients_reach_images_and_landmarks():
    img = torch.tensor(_smooth_image()).permute(2, 0, 1).float()[None] / 255
    img.requires_grad_(True)
    lms = torch.tensor(_landmarks(2))[None].requires_grad_(True)
    out = warp_to_template(img, lms, 112)
    (out * torch.linspace(0, 1, 112)).sum().backward()
    assert img.grad.abs().sum() > 0 and torch.isfinite(lms.grad).all() and lms.grad.abs().sum() > 0


def test_bad_shapes_and_integer_images_are_refused():
    with pytest.raises(ValueError, match=r"\(B, 5, 2\)"):
        warp_to_template(torch.rand(2, 3, 32, 32), torch.rand(2, 4, 2))
    with pytest.raises(ValueError, match="same B"):
        warp_to_template(torch.rand(2, 3, 32, 32), torch.rand(3, 5, 2))
    with pytest.raises(ValueError, match="float"):
        warp_to_template(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ARCFACE_TEMPLATE_112[None])
