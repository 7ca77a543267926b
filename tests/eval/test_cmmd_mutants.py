"""CMMD behaviour pinned down beyond the reference-estimator test (kills mutmut survivors of eval/cmmd.py)."""

from __future__ import annotations

import math

import pytest
import torch
from idforge.eval.cmmd import SCALE, SIGMA, _sq_dists, cmmd, mmd_unbiased


def test_constants_are_the_papers():
    # Jayasumana et al. 2024: sigma = 10, reported x 1000.
    assert SIGMA == 10.0 and SCALE == 1000.0


@pytest.mark.parametrize("n, m", [(1, 3), (3, 1), (1, 1)])
def test_fewer_than_two_per_set_is_refused(n, m):
    with pytest.raises(ValueError, match=rf"^CMMD needs at least 2 images per set, got {n} and {m}$"):
        mmd_unbiased(torch.zeros(n, 4), torch.ones(m, 4))


def test_two_per_set_is_enough_and_hand_computed():
    # x = {0, 0}, y = {0, d}: kxx = 1, kyy = exp(-d^2 / 2 s^2), kxy mean = (1 + e) / 2.
    d, s = 3.0, 2.0
    e = math.exp(-(d**2) / (2 * s**2))
    x = torch.zeros(2, 1)
    y = torch.tensor([[0.0], [d]])
    assert mmd_unbiased(x, y, sigma=s) == pytest.approx(1 + e - (1 + e), abs=1e-12)
    y2 = torch.tensor([[d], [d]])  # both sets collapsed, distance d apart: 1 + 1 - 2 e
    assert mmd_unbiased(x, y2, sigma=s) == pytest.approx(2 - 2 * e, rel=1e-12)


def test_squared_distances_are_exact_and_never_negative():
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1e8, 1e8 + 1]], dtype=torch.float64)
    d = _sq_dists(a, b)
    ref = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    assert d.shape == (2, 3)
    assert torch.allclose(d[:, :2], ref[:, :2])
    assert d[0, 0] == 0.0 and (d >= 0).all()


def test_cmmd_passes_sigma_and_normalises_each_row():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) * 5
    y = torch.randn(3, 6, generator=g, dtype=torch.float64) + 1
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    yn = torch.nn.functional.normalize(y.double(), dim=-1)
    assert cmmd(x, y, sigma=0.5) == pytest.approx(1000 * mmd_unbiased(xn, yn, 0.5), rel=1e-9)
    # Scaling rows changes nothing (L2 normalisation along the feature axis, not across images).
    scale = torch.tensor([[2.0], [0.5], [7.0], [1.0]], dtype=torch.float64)
    assert cmmd(x * scale, y, sigma=0.5) == pytest.approx(cmmd(x, y, sigma=0.5), rel=1e-9)
    assert cmmd(x, y) == pytest.approx(1000 * mmd_unbiased(xn, yn, 10.0), rel=1e-9)
