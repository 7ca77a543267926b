"""5-point face alignment to the ArcFace template (numpy / OpenCV), as insightface's ``norm_crop``.

The similarity transform (rotation, uniform scale, translation; no reflection) that maps the five
detected landmarks onto the template is the least-squares solution of Umeyama (1991), eq. (40)-(42).
``scale < 1`` zooms out around the template's centre, giving the looser "training crop" that
shows hair and background (FFHQ-like), while ``scale = 1`` at 112 px is the ArcFace input.
"""

from __future__ import annotations

import numpy as np

# insightface's arcface_dst for 112 x 112: image-left eye, image-right eye, nose tip, image-left and
# image-right mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ARCFACE_SIZE = 112


def template_for(size: int, scale: float = 1.0) -> np.ndarray:
    """The ArcFace template for a ``size`` x ``size`` output; ``scale`` < 1 zooms out about the centre."""
    if size <= 0 or scale <= 0:
        raise ValueError(f"size and scale must be positive, got size={size}, scale={scale}")
    centre = ARCFACE_SIZE / 2.0
    pts = (ARCFACE_TEMPLATE - centre) * scale + centre
    return (pts * (size / ARCFACE_SIZE)).astype(np.float32)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (2, 3) mapping ``src`` (N, 2) onto ``dst`` (N, 2) (Umeyama)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("source landmarks are degenerate (all points coincide)")
    cov = d.T @ s / len(src)  # (2, 2)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # forbid reflections
        e[1, 1] = -1
    rot = u @ e @ vt
    c = np.trace(np.diag(sig) @ e) / var_s
    t = mu_d - c * rot @ mu_s
    return np.hstack([c * rot, t[:, None]])


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to points (..., 2)."""
    pts = np.asarray(points, dtype=np.float64)
    return (pts @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def transform_box(box: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The axis-aligned (4,) box around all four corners of ``box`` (x0, y0, x1, y1) moved by ``matrix``.

    Moving only two corners is wrong under rotation (a 45-degree turn maps them onto one vertical
    line); the four corners' extent always contains the moved face.
    """
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
    corners = transform_points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), matrix)  # (4, 2)
    return np.concatenate([corners.min(0), corners.max(0)]).astype(np.float32)


def align_face(
    image, landmarks: np.ndarray, size: int = ARCFACE_SIZE, scale: float = 1.0, border: str = "reflect"
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` (H, W, 3) uint8 (or PIL) so its 5 landmarks land on the template.

    Returns the aligned (size, size, 3) uint8 crop and the (2, 3) matrix from image to crop
    coordinates (use :func:`transform_points` to move boxes/landmarks into the crop).
    """
    import cv2

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"align_face expects an (H, W, 3) RGB image, got shape {arr.shape}")
    lms = np.asarray(landmarks, dtype=np.float32).reshape(-1, 2)
    if lms.shape != (5, 2):
        raise ValueError(f"align_face expects 5 landmarks, got {lms.shape[0]}")
    matrix = estimate_similarity(lms, template_for(size, scale))
    modes = {
        "reflect": cv2.BORDER_REFLECT_101,
        "constant": cv2.BORDER_CONSTANT,
        "replicate": cv2.BORDER_REPLICATE,
    }
    if border not in modes:
        raise ValueError(f"border must be one of {sorted(modes)}, got {border!r}")
    out = cv2.warpAffine(
        np.ascontiguousarray(arr), matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=modes[border]
    )
    return out, matrix
