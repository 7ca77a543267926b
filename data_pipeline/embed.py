"""Identity embedders for curation: ArcFace (Deng et al. 2019) on aligned 112 x 112 crops.

``make_embedder(spec)`` accepts

- an idforge face-encoder folder (``FaceEncoder.save_pretrained``) or an arcface_torch
  ``backbone.pth``: the project's torch IResNet (:class:`idforge.models.face.face_encoder.FaceEncoder`);
- an insightface recognition ``.onnx`` (or a pack name such as ``antelopev2``): batched onnxruntime
  (:class:`idforge.models.face.insightface_encoder.InsightFaceRecognizer`); ``backend="torch"`` converts
  the ONNX to the torch IResNet instead (e.g. to run it on a GPU without onnxruntime-gpu);
- ``"none"`` / None: no embedder (identity grouping then needs provided identities).

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

    def __init__(self, backend, batch_size: int = 64, device: str = "cpu", name: str = ""):
        if batch_size < 1:
            raise ValueError(f"Embedder batch_size must be >= 1, got {batch_size}")
        if hasattr(backend, "to"):
            backend = backend.to(device)
        self.backend, self.batch_size, self.name = backend, batch_size, name

    @property
    def embedding_size(self) -> int:
        return int(self.backend.embedding_size)

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """(B, 112, 112, 3) uint8 RGB aligned crops -> (B, 512) float32, L2-normalised."""
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


def make_embedder(
    spec: str | None,
    batch_size: int = 64,
    device: str = "cpu",
    backend: str = "auto",
    root: str | Path = "~/.insightface/models",
) -> Embedder | None:
    """An embedder from a face-encoder folder, ``backbone.pth``, recognition ``.onnx`` / pack name, or None."""
    if spec in (None, "", "none"):
        return None
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"embedder backend must be auto, torch or onnx, got {backend!r}")
    path = Path(str(spec)).expanduser()
    is_torch = path.is_dir() or path.suffix in (".pth", ".pt", ".safetensors")
    if backend == "onnx" or (backend == "auto" and not is_torch):
        from idforge.models.face.insightface_encoder import InsightFaceRecognizer

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        log.info("embedder: insightface ONNX %s", spec)
        return Embedder(
            InsightFaceRecognizer(str(spec), root=root, providers=providers), batch_size, name=str(spec)
        )
    from idforge.models.face.face_encoder import FaceEncoder

    log.info("embedder: torch FaceEncoder %s on %s", spec, device)
    return Embedder(FaceEncoder.from_pretrained(path), batch_size, device, name=str(spec))


def to_storage(emb: np.ndarray) -> np.ndarray:
    """Float16 for shards (the float32 vectors are renormalised first)."""
    emb = np.asarray(emb, dtype=np.float32)
    return _l2(emb.reshape(len(emb), -1)).astype(np.float16)
