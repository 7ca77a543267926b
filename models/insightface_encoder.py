"""Batched ArcFace embeddings through insightface's ONNX recognisers (curation-time embedder).

``insightface.model_zoo.get_model`` loads a recognition ONNX (e.g. buffalo_l ``w600k_r50.onnx``) as an
``ArcFaceONNX`` whose ``get(img, face)`` aligns and embeds one face per call. Curation embeds crops
that are already aligned, many at a time, so :class:`InsightFaceRecognizer` builds the normalised
NCHW batch itself (insightface's own ``input_mean``/``input_std``, RGB order) and runs the
onnxruntime session once per batch. Nothing is ever downloaded: model packs are looked up under a
local root (``~/.insightface/models/<pack>/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def find_recognizer(name_or_path: str, root: str | Path = "~/.insightface/models") -> Path:
    """A recognition ONNX path from a file path or a model-pack name (``buffalo_l``, ``antelopev2``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    pack = Path(root).expanduser() / name_or_path
    candidates = sorted(pack.glob("*.onnx")) if pack.is_dir() else []
    recs = [c for c in candidates if any(k in c.name for k in ("w600k", "glint", "r50", "r100", "arcface"))]
    if not recs:
        raise FileNotFoundError(
            f"no insightface recognition model for {name_or_path!r}: looked for a file, then for "
            f"{pack}/*.onnx (w600k_r50.onnx, glintr100.onnx). Download the pack on a machine with network "
            f"and unpack it there; idforge never downloads models.")
    return recs[0]


class InsightFaceRecognizer:
    def __init__(self, name_or_path: str, root: str | Path = "~/.insightface/models", providers=None):
        from insightface.model_zoo import get_model

        self.path = find_recognizer(name_or_path, root)
        self.model = get_model(str(self.path), providers=providers or ["CPUExecutionProvider"])
        if self.model is None or not hasattr(self.model, "input_mean"):
            raise ValueError(f"{self.path}: insightface did not recognise this as a recognition model")
        self.session = self.model.session
        self.input_name = self.session.get_inputs()[0].name

    @property
    def embedding_size(self) -> int:
        return int(self.session.get_outputs()[0].shape[-1])

    def embed(self, aligned: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(B, 112, 112, 3) uint8 RGB aligned crops -> (B, D) float32, L2-normalised."""
        if aligned.ndim != 4 or aligned.shape[-1] != 3:
            raise ValueError(f"expected (B, H, W, 3) uint8 crops, got {aligned.shape}")
        out = []
        for i in range(0, len(aligned), batch_size):
            x = aligned[i:i + batch_size].astype(np.float32)
            x = (x - self.model.input_mean) / self.model.input_std
            feats = self.session.run(None, {self.input_name: x.transpose(0, 3, 1, 2).copy()})[0]
            out.append(feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12))
        return np.concatenate(out).astype(np.float32)
