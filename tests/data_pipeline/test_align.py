"""5-point similarity alignment (numpy/OpenCV)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from idforge.data_pipeline.align import (
    ARCFACE_TEMPLATE,
    align_face,
    estimate_similarity,
    template_for,
    transform_points,
)


def _similarity(scale, angle, tx, ty):
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


def test_recovers_a_known_similarity_exactly():
    m = _similarity(1.7, 0.4, 12.0, -5.0)
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    dst = transform_points(src, m)
    assert np.allclose(estimate_similarity(src, dst), m, atol=1e-4)


def test_never_returns_a_reflection():
    src = ARCFACE_TEMPLATE.copy()
    mirrored = src.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_template_landmarks_give_the_identity_warp():
    img = np.random.default_rng(1).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    out, m = align_face(img, ARCFACE_TEMPLATE, size=112)
    assert np.allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-5)
    assert np.array_equal(out, img)


def test_landmarks_map_onto_the_scaled_template():
    lms = transform_points(ARCFACE_TEMPLATE, _similarity(0.5, -0.3, 40, 20))
    img = np.zeros((200, 200, 3), np.uint8)
    for size, scale in ((112, 1.0), (64, 0.7)):
        _, m = align_face(img, lms, size=size, scale=scale)
        assert np.allclose(transform_points(lms, m), template_for(size, scale), atol=1e-3)


def test_zoomed_out_template_keeps_the_centre():
    assert np.allclose(template_for(112, 0.5).mean(0) - 56, (ARCFACE_TEMPLATE.mean(0) - 56) * 0.5, atol=1e-4)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="5 landmarks"):
        align_face(np.zeros((10, 10, 3), np.uint8), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        estimate_similarity(np.zeros((5, 2)), ARCFACE_TEMPLATE)
