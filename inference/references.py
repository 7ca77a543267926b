"""Reference faces from real photos: detected and aligned like the training data.

The curation backends find the face (:func:`idforge.data_pipeline.detect.resolve_detector`:
``auto`` = an insightface model pack if one is unpacked, else dlib), and
:func:`idforge.data_pipeline.align.align_face` warps it to the ArcFace 5-point template at the
model's resolution and ``crop_scale`` (the curation's setting, stored in the export), so a
reference looks like the crops the model was trained on. Several faces: the largest, or
``face_index`` (0 = largest, by box area). No face: a one-line error naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of ``path`` (EXIF orientation applied), with one-line errors."""
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image {path} not found")
    try:
        return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    except Exception as exc:  # PIL raises several types for non-images
        raise ValueError(f"{path}: not a readable image ({exc})") from exc


def aligned_reference(
    path: Path,
    resolution: int,
    crop_scale: float,
    landmarks=None,
    detector: str = "auto",
    face_index: int | None = None,
    landmarks_option: str = "--landmarks",
) -> np.ndarray:
    """The (resolution, resolution, 3) uint8 aligned crop of the face in ``path``.

    ``landmarks`` (5 [x, y] pairs, ArcFace order) bypass detection; ``landmarks_option`` is the
    command-line option that passes them, named in the errors.
    """
    from idforge.data_pipeline.align import align_face
    from idforge.data_pipeline.detect import make_detector, resolve_detector

    image = read_image(path)
    if landmarks is not None:
        lms = np.asarray(landmarks, dtype=np.float32)
        if lms.shape != (5, 2):
            raise ValueError(f"{path}: {landmarks_option} must be 5 [x, y] pairs, got shape {lms.shape}")
    else:
        faces = make_detector(resolve_detector(detector, has_landmarks=False)).detect(image)
        if not faces:
            raise ValueError(
                f"{path}: no face found; pass a photo with a visible face, or its 5 landmarks with "
                f"{landmarks_option}"
            )
        faces = sorted(faces, key=lambda f: f.area, reverse=True)
        index = 0 if face_index is None else face_index
        if not 0 <= index < len(faces):
            raise ValueError(f"{path}: --face_index {index} but {len(faces)} face(s) found (0 = the largest)")
        if len(faces) > 1 and face_index is None:
            log.info("%s: %d faces, using the largest (--face_index picks another)", path, len(faces))
        lms = faces[index].landmarks
    crop, _ = align_face(image, lms, size=resolution, scale=crop_scale)
    return crop


def to_tensor(crops: list[np.ndarray]) -> torch.Tensor:
    """uint8 crops -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(crops).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
