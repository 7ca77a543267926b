"""Correctness of the evaluation metrics against direct references, on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from idforge.eval.cmmd import cmmd, mmd_unbiased
from idforge.eval.fid import fiq, frechet_distance
from idforge.eval.identification import face_similarity, flashface_similarity, identification, mean_embedding


def test_frechet_distance_matches_scipy_reference():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64
    )
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) * 1.5 + 0.7
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_cmmd_matches_direct_unbiased_estimator():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * 8
    y = torch.randn(5, 5, generator=g, dtype=torch.float64) * 8 + 3
    k = lambda u, v: math.exp(-float(((u - v) ** 2).sum()) / (2 * 10.0**2))
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    assert mmd_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    assert cmmd(x, y) == pytest.approx(1000 * mmd_unbiased(xn, yn), rel=1e-9)


def test_fiq_arithmetic():
    # Diff-ID Table 1: FS 72.68 %, FID 101.31 -> FIQ 71.74
    assert fiq(0.7268, 101.31) == pytest.approx(71.74, abs=0.01)
    with pytest.raises(ValueError):
        fiq(0.5, 0.0)


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_fs_ip_and_undetected_on_hand_made_embeddings():
    gen = _unit([1, 0, 0], [0, 1, 0], [1, 1, 0])
    gen[2] = float("nan")  # face not detected
    src = _unit([1, 0, 0], [1, 1, 0], [0, 0, 1])
    fs = face_similarity(gen, src)
    assert fs["mean"] == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert fs["scored"] == 2 and fs["undetected"] == 1
    photos = _unit([1, 0, 0], [0, 1, 0])
    assert torch.allclose(mean_embedding(photos), _unit([1, 1, 0])[0])


def test_identification_top1_top5_and_chance():
    gallery = torch.eye(6)
    gen = torch.eye(6).clone()
    gen[1] = torch.tensor([1.0, 0.9, 0, 0, 0, 0])  # closest to identity 0: top-1 miss, top-5 hit
    gen[2] = float("nan")  # undetected: a miss
    out = identification(gen, gallery)
    assert out["top1"] == pytest.approx(4 / 6)
    assert out["top5"] == pytest.approx(5 / 6)
    assert out["chance_top1"] == pytest.approx(1 / 6) and out["chance_top5"] == pytest.approx(5 / 6)


def test_flashface_sim_target_sim_ref_paste():
    gen = _unit([1, 0, 0], [0, 1, 0])
    target = _unit([1, 1, 0], [0, 1, 0])
    refs = torch.stack([_unit([1, 0, 0], [0, 0, 1]), _unit([0, 0, 1], [1, 0, 0])])  # (N, R, D)
    out = flashface_similarity(gen, target, refs)
    st = (math.sqrt(0.5) + 1) / 2
    sr = (1 + 0) / 2
    assert out["sim_target"] == pytest.approx(st)
    assert out["sim_ref"] == pytest.approx(sr)
    assert out["paste"] == pytest.approx(sr - st)
