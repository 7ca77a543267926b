"""Identity embedders for curation: ArcFace (Deng et al. 2019) on aligned 112 x 112 crops.

``make_embedder(spec)`` accepts

- an idforge face-encoder folder (``FaceEncoder.save_pretrained``) or an arcface_torch
  ``backbone.pth``: the project's torch IResNet (:class:`idforge.models.face.face_encoder.FaceEncoder`);
- an insightface recognition ``.onnx`` (or a pack name such as ``antelopev2``): batched onnxruntime
  (:class:`idforge.models.face.insightface_encoder.InsightFaceRecognizer`); ``backend="torch"`` converts
  the ONNX to the torch IResNet instead (e.g. to run it on a GPU without onnxruntime-gpu);
- ``dlib``: dlib's 128-d ResNet face descriptor (the ``dlib`` extra), run with dlib's own 5-point
  chip alignment on a loose aligned crop; its cosine scale differs from ArcFace's, so thresholds
  come from :data:`THRESHOLDS` by :func:`embedder_kind`;
- ``auto``: :func:`resolve_embedder` (an insightface pack's ArcFace, else dlib, else none);
- ``"none"`` / None: no embedder (identity grouping then needs provided identities).

``device`` = ``cuda`` moves the torch IResNet to the GPU (``fp16=True`` runs it in half precision)
and gives onnxruntime the CUDA provider.

``Embedder.embed`` returns float32 (B, 512), L2-normalised; :func:`to_storage` casts to the float16
stored in shards (renormalised first so that the stored vectors have unit norm to ~1e-3).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


class Embedder:
    """Wraps any backend with ``embed_uint8(images, batch_size)`` or ``embed(images, batch_size)``."""

    def __init__(
        self, backend, batch_size: int = 64, device: str = "cpu", name: str = "", fp16: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"Embedder batch_size must be >= 1, got {batch_size}")
        if hasattr(backend, "to"):
            backend = backend.to(device)
            if fp16 and str(device).startswith("cuda"):
                backend = backend.half()
        self.backend, self.batch_size, self.name = backend, batch_size, name

    @property
    def input_size(self) -> int:
        """Side of the aligned crop this embedder takes (112 for ArcFace)."""
        return int(getattr(self.backend, "input_size", 112))

    @property
    def crop_scale(self) -> float:
        """Zoom of the ArcFace template for this embedder's crop (1.0 = the tight ArcFace crop)."""
        return float(getattr(self.backend, "crop_scale", 1.0))

    @property
    def embedding_size(self) -> int:
        return int(self.backend.embedding_size)

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB aligned crops (S = input_size) -> (B, D) float32, L2-normalised."""
        aligned = np.asarray(aligned)
        if aligned.ndim != 4 or aligned.shape[-1] != 3 or aligned.dtype != np.uint8:
            raise ValueError(
                f"Embedder.embed expects (B, 112, 112, 3) uint8 RGB crops, got "
                f"{aligned.dtype} {aligned.shape}"
            )
        if len(aligned) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        fn = getattr(self.backend, "embed_uint8", None) or self.backend.embed
        return _l2(fn(aligned, batch_size=self.batch_size))


THRESHOLDS = {
    "arcface": {"identity": 0.5, "duplicate": 0.95},
    "dlib": {"identity": 0.92, "duplicate": 0.99},
}
"""Cosine thresholds per embedder kind: ``identity`` (same person, the unlabelled clustering default)
and ``duplicate`` (near-duplicate photo). dlib's documented same-person rule is a Euclidean distance
below 0.6 between raw descriptors; their norms are about 1.45, so on unit vectors that is a cosine
above 1 - (0.6 / 1.45)**2 / 2 = 0.91 (six different people in insightface's t1.jpg reach 0.90)."""


def embedder_kind(spec: str | None) -> str | None:
    """``dlib``, ``arcface`` (any other face encoder) or None (no embedder)."""
    if spec in (None, "", "none"):
        return None
    return "dlib" if str(spec) == "dlib" else "arcface"


def find_recognition_model(pack: Path) -> Path | None:
    """The recognition ONNX of an insightface pack (the largest .onnx that is not a detector or
    landmark/attribute model: glintr100.onnx in antelopev2, w600k_r50.onnx in buffalo_l)."""
    from .detect import DETECTOR_NAME_HINTS

    skip = (*DETECTOR_NAME_HINTS, "2d106", "1k3d68", "genderage", "landmark")
    found = [p for p in pack.glob("*.onnx") if not any(k in p.name.lower() for k in skip)]
    return max(found, key=lambda p: p.stat().st_size) if found else None


def resolve_embedder(spec: str | None, root: str | Path | None = None) -> str | None:
    """``auto`` -> the ArcFace recognition ONNX of an insightface pack when one is found, else ``dlib``
    when its extra is installed, else None (no embeddings). Other specs are returned unchanged."""
    if spec != "auto":
        return spec
    from .detect import dlib_available, find_model_pack

    pack = find_model_pack(root)
    model = find_recognition_model(pack) if pack is not None else None
    if model is not None:
        return str(model)
    return "dlib" if dlib_available() else None


class DlibDescriptor:
    """dlib's 128-d face descriptor (``dlib_face_recognition_resnet_model_v1``) on a loose aligned crop.

    dlib's network expects its own 150 px chip; the crop (ArcFace template zoomed out to
    ``crop_scale``) is re-aligned by dlib's 5-point predictor and ``compute_face_descriptor`` exactly
    as dlib does on a full photo."""

    input_size = 200
    crop_scale = 0.6
    embedding_size = 128

    def __init__(self):
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as exc:
            raise ImportError(
                "the dlib embedder needs the `dlib` extra: pip install 'idforge[dlib]'"
            ) from exc
        from .align import template_for
        from .detect import box_from_landmarks

        self._dlib = dlib
        self._net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        self._shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
        x0, y0, x1, y1 = box_from_landmarks(template_for(self.input_size, self.crop_scale)).round()
        self._rect = dlib.rectangle(int(x0), int(y0), int(x1), int(y1))

    def embed(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = []
        for im in images:
            im = np.ascontiguousarray(im)
            out.append(np.asarray(self._net.compute_face_descriptor(im, self._shape(im, self._rect))))
        return np.asarray(out, dtype=np.float32).reshape(len(images), self.embedding_size)


def make_embedder(
    spec: str | None,
    batch_size: int = 64,
    device: str = "cpu",
    backend: str = "auto",
    root: str | Path = "~/.insightface/models",
    fp16: bool = False,
) -> Embedder | None:
    """An embedder from a face-encoder folder, ``backbone.pth``, recognition ``.onnx`` / pack name,
    ``dlib``, or None. ``auto`` must be resolved first (:func:`resolve_embedder`)."""
    if spec in (None, "", "none"):
        return None
    if spec == "dlib":
        return Embedder(DlibDescriptor(), batch_size, name="dlib")
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"embedder backend must be auto, torch or onnx, got {backend!r}")
    path = Path(str(spec)).expanduser()
    is_torch = path.is_dir() or path.suffix in (".pth", ".pt", ".safetensors")
    if backend == "onnx" or (backend == "auto" and not is_torch):
        from idforge.models.face.insightface_encoder import InsightFaceRecognizer

        from .detect import onnx_providers

        log.info("embedder: insightface ONNX %s on %s", spec, device)
        return Embedder(
            InsightFaceRecognizer(str(spec), root=root, providers=onnx_providers(device)),
            batch_size,
            name=str(spec),
        )
    from idforge.models.face.face_encoder import FaceEncoder

    log.info("embedder: torch FaceEncoder %s on %s%s", spec, device, " (fp16)" if fp16 else "")
    return Embedder(FaceEncoder.from_pretrained(path), batch_size, device, name=str(spec), fp16=fp16)


def to_storage(emb: np.ndarray) -> np.ndarray:
    """Float16 for shards (the float32 vectors are renormalised first)."""
    emb = np.asarray(emb, dtype=np.float32)
    return _l2(emb.reshape(len(emb), -1)).astype(np.float16)
