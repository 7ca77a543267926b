"""FID / FIQ edges pinned down (kills mutmut survivors of eval/fid.py): the two-image minimum, the
unbiased covariance, and FIQ's refusal of a non-positive FID only."""

from __future__ import annotations

import pytest
import torch
from idforge.eval.fid import fiq, frechet_distance, gaussian_stats


def test_gaussian_stats_needs_two_images_and_accepts_two():
    with pytest.raises(ValueError, match=r"^FID needs at least 2 images per set, got 1$"):
        gaussian_stats(torch.zeros(1, 3))
    mu, cov = gaussian_stats(torch.tensor([[0.0, 2.0], [2.0, 0.0]]))
    assert mu.dtype == torch.float64 and cov.dtype == torch.float64
    assert torch.equal(mu, torch.tensor([1.0, 1.0], dtype=torch.float64))
    # Unbiased (N - 1) covariance: deviations +-1 on each axis, anti-correlated.
    assert torch.equal(cov, torch.tensor([[2.0, -2.0], [-2.0, 2.0]], dtype=torch.float64))


def test_frechet_distance_of_shifted_copies_is_the_squared_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 3, generator=g, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)


def test_fiq_accepts_any_positive_fid_and_refuses_zero_or_negative():
    assert fiq(0.5, 0.5) == pytest.approx(10000.0)
    assert fiq(-0.25, 2.0) == pytest.approx(-1250.0)
    assert fiq(0.5, 1.0) == pytest.approx(5000.0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^FIQ needs a positive FID, got {bad}$"):
            fiq(0.5, bad)
