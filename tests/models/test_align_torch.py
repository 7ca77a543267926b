"""The differentiable torch warp matches OpenCV's and passes gradients."""

from __future__ import annotations

import math

import numpy as np
import torch

from idforge.data_pipeline.align import ARCFACE_TEMPLATE, align_face, estimate_similarity, transform_points
from idforge.models.align_torch import ARCFACE_TEMPLATE_112, estimate_similarity_torch, warp_to_template


def _landmarks(seed):
    rng = np.random.default_rng(seed)
    a, s = rng.uniform(-0.5, 0.5), rng.uniform(0.8, 1.2)
    m = np.array([[s * math.cos(a), -s * math.sin(a), rng.uniform(60, 80)],
                  [s * math.sin(a), s * math.cos(a), rng.uniform(60, 80)]])
    return transform_points(ARCFACE_TEMPLATE, m)


def test_similarity_matches_numpy_umeyama():
    src = np.stack([_landmarks(i) for i in range(3)])
    got = estimate_similarity_torch(torch.tensor(src), ARCFACE_TEMPLATE_112)
    for i in range(3):
        assert np.allclose(got[i].numpy(), estimate_similarity(src[i], ARCFACE_TEMPLATE), atol=1e-3)


def test_warp_matches_cv2_warp_affine():
    rng = np.random.default_rng(0)
    # smooth image so bilinear interpolation differences stay small
    base = rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    import cv2

    img = cv2.resize(base, (256, 256), interpolation=cv2.INTER_CUBIC)  # the crop lies inside
    lms = np.stack([_landmarks(i) for i in range(2)])
    ref = np.stack([align_face(img, lm, 112)[0] for lm in lms]).astype(np.float32)
    x = torch.tensor(img).permute(2, 0, 1).float()[None].expand(2, -1, -1, -1)
    got = warp_to_template(x, torch.tensor(lms), 112).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - ref).mean() < 1.0  # uint8 rounding and interpolation weights


def test_template_landmarks_give_identity_and_gradients_flow():
    x = torch.rand(2, 3, 112, 112, requires_grad=True)
    out = warp_to_template(x, ARCFACE_TEMPLATE_112.expand(2, 5, 2), 112)
    assert torch.allclose(out, x, atol=1e-4)
    out[0].sum().backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() == 0  # batch elements independent
