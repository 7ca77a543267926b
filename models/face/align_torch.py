"""Differentiable, batched 5-point alignment to the ArcFace template (torch ``grid_sample``).

The identity loss of Diff-ID (sec. 3.3) compares ArcFace embeddings of the predicted clean image
and the original; the face in x0_hat is cut out with the sample's stored 5 landmarks, so the crop
must be differentiable with respect to the image (and, here, also to the landmarks).

Similarity transform. The least-squares rotation + uniform scale + translation (no reflection)
mapping points s_i onto d_i (Umeyama 1991, eq. (40)-(42)) has, in 2-D, the closed form: with
centred points s_i, d_i,

    a = sum(s_i . d_i) / sum |s_i|^2,   b = sum(s_i x d_i) / sum |s_i|^2,
    M = [[a, -b, tx], [b, a, ty]],      t = mean(d) - [[a, -b], [b, a]] mean(s).

(Writing the rotation-scale as the complex number a + ib, minimising sum |d_i - (a + ib) s_i|^2 is
linear least squares; its solution equals Umeyama's SVD solution restricted to det R = +1, and it
cannot produce a reflection.) It is solved in float64, then cast back.

Warp. ``out(p) = image(M^-1 p)`` for every output pixel centre p, with OpenCV's convention that
integer coordinates are pixel centres; ``grid_sample(align_corners=False)`` takes pixel centre i
at normalised (2i + 1) / W - 1. The result therefore matches ``cv2.warpAffine(image, M, ...,
INTER_LINEAR)`` of the same matrix up to interpolation rounding (tested against OpenCV).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ARCFACE_TEMPLATE_112 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=torch.float32,
)
"""insightface's ``arcface_dst``: image-left eye, image-right eye, nose tip, mouth corners (x, y)."""

# torch padding mode for each OpenCV border mode name used in data_pipeline/align.py
PADDING_MODES = {
    "zeros": "zeros",
    "constant": "zeros",
    "border": "border",
    "replicate": "border",
    "reflection": "reflection",
    "reflect": "reflection",
}


def estimate_similarity_torch(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) similarity matrices mapping ``src`` (B, N, 2) onto ``dst`` (N, 2) or (B, N, 2).

    Differentiable with respect to both point sets; degenerate ``src`` (all points equal) gives a
    zero rotation-scale rather than NaNs.
    """
    if src.dim() != 3 or src.shape[-1] != 2 or src.shape[1] < 2:
        raise ValueError(f"estimate_similarity_torch: src must be (B, N>=2, 2), got {tuple(src.shape)}")
    if dst.dim() == 2:
        dst = dst.unsqueeze(0).expand(src.shape[0], -1, -1)  # (B, N, 2)
    if dst.shape != src.shape:
        raise ValueError(
            f"estimate_similarity_torch: dst must be (N, 2) or (B, N, 2) matching src "
            f"{tuple(src.shape)}, got {tuple(dst.shape)}"
        )
    out_dtype = torch.promote_types(src.dtype, torch.float32)
    s64, d64 = src.double(), dst.to(src.device).double()
    mu_s, mu_d = s64.mean(1, keepdim=True), d64.mean(1, keepdim=True)  # (B, 1, 2)
    s, d = s64 - mu_s, d64 - mu_d  # (B, N, 2)
    norm = (s**2).sum((1, 2)).clamp_min(1e-12)  # (B,)
    a = (s * d).sum((1, 2)) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)  # (B, 2, 2)
    t = mu_d.squeeze(1) - (rot @ mu_s.squeeze(1).unsqueeze(-1)).squeeze(-1)  # (B, 2)
    return torch.cat([rot, t.unsqueeze(-1)], dim=-1).to(out_dtype)  # (B, 2, 3)


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of (B, 2, 3) affine matrices, as (B, 2, 3)."""
    rot, t = matrix[:, :, :2], matrix[:, :, 2:]
    inv = torch.linalg.inv(rot)
    return torch.cat([inv, -inv @ t], dim=-1)


def warp_affine(
    images: torch.Tensor, matrix: torch.Tensor, out_size: int | tuple[int, int], padding_mode: str = "border"
) -> torch.Tensor:
    """``cv2.warpAffine`` in torch: out(p) = images(M^-1 p) for a (B, 2, 3) ``matrix``, bilinear.

    ``out_size`` is an int (square) or (height, width); ``padding_mode`` is one of
    :data:`PADDING_MODES` ("zeros" = cv2's BORDER_CONSTANT, "border" = BORDER_REPLICATE).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"warp_affine: images must be a float (B, C, H, W) tensor, got "
            f"{images.dtype} {tuple(images.shape)}; convert uint8 with .float()"
        )
    if matrix.shape != (images.shape[0], 2, 3):
        raise ValueError(f"warp_affine: matrix must be ({images.shape[0]}, 2, 3), got {tuple(matrix.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"warp_affine: padding_mode must be one of {sorted(PADDING_MODES)}, got {padding_mode!r}"
        )
    b, _, h, w = images.shape
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    inv = invert_affine(matrix.to(images.device, images.dtype))  # output pixel -> input pixel
    ys = torch.arange(oh, device=images.device, dtype=images.dtype)
    xs = torch.arange(ow, device=images.device, dtype=images.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pix = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(1, -1, 3)  # (1, oh*ow, 3)
    src = pix @ inv.transpose(1, 2)  # (B, oh*ow, 2) input pixel-centre coordinates
    gx = (2 * src[..., 0] + 1) / w - 1  # align_corners=False: centre i -> (2i + 1) / W - 1
    gy = (2 * src[..., 1] + 1) / h - 1
    grid = torch.stack([gx, gy], -1).reshape(b, oh, ow, 2)  # (B, oh, ow, 2)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode=PADDING_MODES[padding_mode], align_corners=False
    )


def template_matrix(
    landmarks: torch.Tensor, out_size: int = 112, template: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 2, 3) matrices from image pixels to the ``out_size`` crop for (B, 5, 2) landmarks.

    ``template`` ((5, 2) or (B, 5, 2), pixel coordinates of the crop) defaults to the ArcFace 112
    template scaled to ``out_size``.
    """
    if landmarks.dim() != 3 or landmarks.shape[-2:] != (5, 2):
        raise ValueError(f"landmarks must be (B, 5, 2) pixel coordinates, got {tuple(landmarks.shape)}")
    tpl = ARCFACE_TEMPLATE_112 * (out_size / 112.0) if template is None else template
    return estimate_similarity_torch(landmarks, tpl.to(landmarks.device))


def crop_corners(
    landmarks: torch.Tensor, out_size: int = 112, template: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 4, 2) image-pixel coordinates of the aligned crop's outer corners (pixel edges -0.5 and
    out_size - 0.5 of the crop, mapped back through the inverse similarity): where the crop comes from."""
    m = invert_affine(template_matrix(landmarks, out_size, template))  # crop -> image
    lo, hi = -0.5, out_size - 0.5
    corners = torch.tensor([[lo, lo, 1.0], [hi, lo, 1.0], [hi, hi, 1.0], [lo, hi, 1.0]], dtype=m.dtype)
    return corners.to(m.device) @ m.transpose(1, 2)  # (B, 4, 2)


def minification(landmarks: torch.Tensor, out_size: int = 112, template: torch.Tensor | None = None):
    """(B,) input pixels per output pixel of the alignment warp (> 1: the warp shrinks the face)."""
    m = template_matrix(landmarks, out_size, template)
    return 1.0 / m[:, :, 0].norm(dim=-1).clamp_min(1e-12)  # |(a, b)| = the similarity's scale


def _prefiltered(images: torch.Tensor, landmarks: torch.Tensor, factor: torch.Tensor):
    """Per sample: shrink the image by its minification factor with an antialiased resize (a low-pass
    prefilter, so the bilinear warp then samples about one input pixel per output pixel) and move
    its landmarks into the resized image's pixel coordinates."""
    h, w = images.shape[-2:]
    out, lms = [], []
    for img, lm, f in zip(images, landmarks, factor.tolist()):
        if f <= 1.0:
            out.append(img[None])
            lms.append(lm)
            continue
        nh, nw = max(1, round(h / f)), max(1, round(w / f))
        small = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        ratio = torch.tensor([w / nw, h / nh], dtype=lm.dtype, device=lm.device)
        out.append(small)
        lms.append((lm + 0.5) / ratio - 0.5)  # pixel centres: old x = (new x + 0.5) * ratio - 0.5
    return out, torch.stack(lms)


def warp_to_template(
    images: torch.Tensor,
    landmarks: torch.Tensor,
    out_size: int = 112,
    template: torch.Tensor | None = None,
    padding_mode: str = "border",
    antialias: bool = False,
) -> torch.Tensor:
    """Align (B, C, H, W) images with their (B, 5, 2) landmarks (pixel coordinates) -> (B, C, out, out).

    Differentiable with respect to ``images`` and ``landmarks``; each batch element uses only its
    own landmarks. ``template`` as in :func:`template_matrix`. ``antialias``: where the warp
    minifies (a face larger than the crop), prefilter first (an antialiased resize by the
    minification factor) instead of letting bilinear sampling skip pixels and alias; with it off
    the result matches ``cv2.warpAffine`` (as insightface's ``norm_crop`` does).
    """
    if images.dim() != 4 or landmarks.shape[0] != images.shape[0]:
        raise ValueError(
            f"warp_to_template: images must be (B, C, H, W) and landmarks (B, 5, 2) with the "
            f"same B, got {tuple(images.shape)} and {tuple(landmarks.shape)}"
        )
    landmarks = landmarks.to(images.device)
    if antialias:
        factor = minification(landmarks.detach(), out_size, template)
        if (factor > 1.0).any():
            small, lms = _prefiltered(images, landmarks, factor)
            per_sample = template is not None and template.dim() == 3
            return torch.cat(
                [
                    warp_affine(
                        im,
                        template_matrix(lms[i : i + 1], out_size, template[i] if per_sample else template),
                        out_size,
                        padding_mode,
                    )
                    for i, im in enumerate(small)
                ]
            )  # (B, C, out, out)
    m = template_matrix(landmarks, out_size, template)
    return warp_affine(images, m, out_size, padding_mode)
