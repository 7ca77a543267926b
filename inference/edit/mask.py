"""Edit mask from an attention map, FINEdits sec. 3.1 / SPEC.md sec. 5.

Binarise with k-means (2 centres, the cluster with the larger centre is the edit region), dilate
with max pooling (the mask should overshoot the region, Couairon et al. 2022), optionally smooth
with a Gaussian blur so the pasted edit merges with the kept part. FINEdits' kernel sizes (Table 3)
are for SD3 at 1024 px, whose attention grid is 64 x 64 tokens; :func:`scaled_kernel` maps them to
another grid by the same fraction of the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_GRID = 64  # SD3-medium's image-token grid at 1024 px, where Table 3's kernels were tuned


def kmeans_mask(attention: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, 1, h, w) attention -> {0, 1} mask of the same shape: k-means with 2 centres per image."""
    from sklearn.cluster import KMeans

    out = torch.zeros_like(attention, dtype=torch.float32)
    for b in range(attention.shape[0]):
        x = attention[b].reshape(-1, 1).float().cpu().numpy().astype(np.float64)
        if np.ptp(x) == 0:
            continue  # a flat map has no region to find
        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x)
        high = int(np.argmax(km.cluster_centers_[:, 0]))
        out[b] = torch.from_numpy((km.labels_ == high).astype(np.float32)).reshape(attention.shape[1:])
    return out.to(attention.device)


def scaled_kernel(kernel: int, grid: int, reference: int = REFERENCE_GRID) -> int:
    """A Table-3 kernel (tuned on a ``reference`` grid) for a ``grid``-wide map: same image fraction,
    odd, at least 1."""
    k = max(1, round(kernel * grid / reference))
    return k if k % 2 else k + 1


def dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool dilation with an odd ``kernel`` (stride 1, same size)."""
    if kernel <= 1:
        return mask
    if kernel % 2 == 0:
        raise ValueError(f"dilation kernel must be odd, got {kernel}")
    return F.max_pool2d(mask, kernel_size=kernel, stride=1, padding=kernel // 2)


def blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (kernel 2*ceil(3 sigma)+1); sigma 0 returns the mask."""
    if sigma <= 0:
        return mask
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * int(np.ceil(3 * sigma)) + 1
    return gaussian_blur(mask, kernel_size=[k, k], sigma=[sigma, sigma])


def make_mask(attention: torch.Tensor, kernel: int = 1, sigma: float = 0.0, seed: int = 0) -> torch.Tensor:
    """k-means -> max-pool dilation (``kernel`` on this grid) -> blur: (B, 1, h, w) in [0, 1]."""
    return blur(dilate(kmeans_mask(attention, seed), kernel), sigma).clamp(0, 1)
