"""Per-image quality filters of the curation job (Diff-ID sec. 3.1, FlashFace sec. 3.1).

Each filter returns a reject reason (the manifest's key) or None: ``no_face``, ``multiple_faces``
(policy: reject, or keep the largest face), ``det_score``, ``face_size`` (absolute pixels and fraction
of the image), ``resolution``, ``blur`` (variance of the Laplacian of the face crop: low = blurry).
Near-duplicates are removed by :func:`near_duplicates` on embeddings, in chunks (no N x N matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .detect import FaceDetection


@dataclass
class FilterConfig:
    min_det_score: float = 0.5
    min_face_px: float = 16.0
    min_face_fraction: float = 0.0
    min_resolution: int = 32
    min_sharpness: float | None = None
    """Minimum variance of the Laplacian on the grey face crop (None: no blur filter)."""
    multiple_faces: str = "reject"
    duplicate_threshold: float | None = 0.98
    """Cosine above which an image duplicates an earlier one of the same identity (None: keep all)."""

    def __post_init__(self):
        if self.multiple_faces not in ("reject", "largest"):
            raise ValueError(f"multiple_faces must be 'reject' or 'largest', got {self.multiple_faces!r}")


def sharpness(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian."""
    g = gray.astype(np.float32)
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var()) if lap.size else 0.0


def check_face(image: np.ndarray, detections: list[FaceDetection], cfg: FilterConfig
               ) -> tuple[FaceDetection | None, str | None]:
    h, w = image.shape[:2]
    if min(h, w) < cfg.min_resolution:
        return None, "resolution"
    if not detections:
        return None, "no_face"
    if len(detections) > 1:
        if cfg.multiple_faces == "reject":
            return None, "multiple_faces"
        detections = [max(detections, key=lambda d: d.size)]
    det = detections[0]
    if det.score < cfg.min_det_score:
        return None, "det_score"
    if det.size < cfg.min_face_px or det.size / min(h, w) < cfg.min_face_fraction:
        return None, "face_size"
    if cfg.min_sharpness is not None:
        x0, y0, x1, y1 = np.clip(det.box, 0, [w, h, w, h]).astype(int)
        crop = image[y0:y1, x0:x1].mean(-1) if x1 > x0 + 2 and y1 > y0 + 2 else image.mean(-1)
        if sharpness(crop) < cfg.min_sharpness:
            return None, "blur"
    return det, None


def near_duplicates(embeddings: np.ndarray, threshold: float, chunk: int = 4096) -> np.ndarray:
    """Keep mask: an image is dropped if its cosine to an EARLIER kept image is >= ``threshold``."""
    n = len(embeddings)
    keep = np.ones(n, dtype=bool)
    e = embeddings.astype(np.float32)
    for start in range(0, n, chunk):
        block = e[start:start + chunk]
        for j in range(len(block)):
            i = start + j
            if i == 0:
                continue
            kept = np.flatnonzero(keep[:i])
            if kept.size and float((e[kept] @ block[j]).max()) >= threshold:
                keep[i] = False
    return keep
