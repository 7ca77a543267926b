"""CMMD (Jayasumana et al., "Rethinking FID", CVPR 2024): MMD between CLIP embeddings of two image
sets with a Gaussian RBF kernel k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), sigma = 10, the unbiased
estimator (diagonal terms excluded), reported x 1000 as in the paper.
"""

from __future__ import annotations

import torch

SIGMA = 10.0
SCALE = 1000.0


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)  # (N, M)


def mmd_unbiased(x: torch.Tensor, y: torch.Tensor, sigma: float = SIGMA) -> float:
    """Unbiased MMD^2 between samples x (N, D) and y (M, D), N, M >= 2."""
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"CMMD needs at least 2 images per set, got {n} and {m}")
    gamma = 1.0 / (2 * sigma**2)
    kxx = torch.exp(-gamma * _sq_dists(x, x))
    kyy = torch.exp(-gamma * _sq_dists(y, y))
    kxy = torch.exp(-gamma * _sq_dists(x, y))
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def cmmd(clip_a: torch.Tensor, clip_b: torch.Tensor, sigma: float = SIGMA) -> float:
    """CMMD x 1000 between L2-normalised CLIP image embeddings of two sets."""
    a = torch.nn.functional.normalize(clip_a.double(), dim=-1)
    b = torch.nn.functional.normalize(clip_b.double(), dim=-1)
    return SCALE * mmd_unbiased(a, b, sigma)
