"""FID (Heusel et al. 2017) and Diff-ID's FIQ = 100 * FS% / FID (Diff-ID eq. 4, SPEC sec. 8).

The Frechet distance between two Gaussians fitted to image features,
d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}), is torchmetrics' own ``_compute_fid``
(the code behind ``torchmetrics.image.FrechetInceptionDistance``); here it is fed features we
computed ourselves so they can be cached per image and resumed (:mod:`idforge.eval.features`).

Feature weights never download: ``inception:PATH`` loads torch-fidelity's FID Inception-v3
(``weights-inception-2015-12-05-6726825d.pth``, the weights every FID paper uses) from a local file
through torchmetrics' ``NoTrainInceptionV3``; ``clip:SPEC`` uses open_clip image features
(clean-fid's CLIP-FID variant), which is what the tests run with a tiny random open_clip folder.
"""

from __future__ import annotations

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = features.double()
    if f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {f.shape[0]}")
    return f.mean(0), torch.cov(f.T)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D), via torchmetrics' ``_compute_fid``."""
    from torchmetrics.image.fid import _compute_fid

    mu1, s1 = gaussian_stats(features_a)
    mu2, s2 = gaussian_stats(features_b)
    return float(_compute_fid(mu1, s1, mu2, s2))


def fiq(fs: float, fid: float) -> float:
    """Diff-ID eq. (4): FIQ = 100 * FS% / FID, with FS a cosine in [-1, 1] (FS% = 100 * FS)."""
    if fid <= 0:
        raise ValueError(f"FIQ needs a positive FID, got {fid}")
    return 100.0 * (100.0 * fs) / fid
