"""Differentiable, batched 5-point alignment to the ArcFace template (torch ``grid_sample``).

The identity loss of Diff-ID (sec. 3.3) compares ArcFace embeddings of the predicted clean image
and the original; the face in x0_hat is cut out with the sample's stored 5 landmarks. The
least-squares similarity transform in 2-D has a closed form (equivalent to Umeyama's solution):
with centred points s_i, d_i,

    a = sum(s_i . d_i) / sum |s_i|^2,   b = sum(s_i x d_i) / sum |s_i|^2,
    M = [[a, -b, tx], [b, a, ty]],      t = mean(d) - [[a, -b], [b, a]] mean(s).

The warp samples the image at M^-1 of each output pixel centre, with OpenCV's pixel-centre
convention, so it matches ``cv2.warpAffine`` up to interpolation error and stays differentiable
with respect to the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ARCFACE_TEMPLATE_112 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=torch.float32,
)


def estimate_similarity_torch(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) similarity matrices mapping ``src`` (B, N, 2) onto ``dst`` (N, 2) or (B, N, 2)."""
    if dst.dim() == 2:
        dst = dst.unsqueeze(0).expand_as(src)
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - mu_s, dst - mu_d  # (B, N, 2)
    norm = (s**2).sum((1, 2)).clamp_min(1e-12)  # (B,)
    a = (s * d).sum((1, 2)) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)  # (B, 2, 2)
    t = mu_d.squeeze(1) - (rot @ mu_s.squeeze(1).unsqueeze(-1)).squeeze(-1)  # (B, 2)
    return torch.cat([rot, t.unsqueeze(-1)], dim=-1)


def _invert_affine(m: torch.Tensor) -> torch.Tensor:
    rot, t = m[:, :, :2], m[:, :, 2:]
    inv = torch.linalg.inv(rot)
    return torch.cat([inv, -inv @ t], dim=-1)


def warp_affine(images: torch.Tensor, matrix: torch.Tensor, out_size: int, padding_mode: str = "border") -> torch.Tensor:
    """``cv2.warpAffine`` in torch: out(p) = images(M^-1 p) for (B, 2, 3) ``matrix``, bilinear."""
    b, _, h, w = images.shape
    inv = _invert_affine(matrix.to(images.dtype))  # output pixel -> input pixel
    coords = torch.arange(out_size, device=images.device, dtype=images.dtype)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    pix = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(1, -1, 3)  # (1, out*out, 3)
    src = pix @ inv.transpose(1, 2)  # (B, out*out, 2) input pixel centres
    gx = (2 * src[..., 0] + 1) / w - 1  # align_corners=False normalisation
    gy = (2 * src[..., 1] + 1) / h - 1
    grid = torch.stack([gx, gy], -1).reshape(b, out_size, out_size, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def warp_to_template(images: torch.Tensor, landmarks: torch.Tensor, out_size: int = 112,
                     template: torch.Tensor | None = None) -> torch.Tensor:
    """Align (B, C, H, W) images with their (B, 5, 2) landmarks (pixel coordinates) to the template.

    ``template`` defaults to the ArcFace 112 template scaled to ``out_size``.
    """
    if landmarks.shape[-2:] != (5, 2) or landmarks.shape[0] != images.shape[0]:
        raise ValueError(f"landmarks must be (B, 5, 2) for B={images.shape[0]}, got {tuple(landmarks.shape)}")
    tpl = ARCFACE_TEMPLATE_112 * (out_size / 112.0) if template is None else template
    m = estimate_similarity_torch(landmarks.float(), tpl.to(landmarks.device).float())
    return warp_affine(images, m, out_size)
