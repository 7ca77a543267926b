"""Batched ArcFace embeddings through insightface's ONNX recognisers (curation-time embedder).

``insightface.model_zoo.get_model`` loads a recognition ONNX (e.g. buffalo_l ``w600k_r50.onnx``,
antelopev2 ``glintr100.onnx``) as an ``ArcFaceONNX``. Its ``get(img, face)`` aligns and embeds one
face per call; ``get_feat`` does accept a list of BGR crops (one ``cv2.dnn.blobFromImages`` call),
and ``forward(nchw)`` takes an already-stacked batch and applies the model's own
``input_mean``/``input_std`` (127.5/127.5 for arcface_torch exports, 0/1 for mxnet exports whose
graph normalises inside). Curation has RGB crops that are already aligned, many at a time, so
:class:`InsightFaceRecognizer` stacks them NCHW and calls ``forward`` once per batch: insightface's
own preprocessing, one onnxruntime run per batch. Models exported with a fixed batch dimension are
fed in chunks of that size.

Nothing is ever downloaded: model packs are looked up under a local root (``~/.insightface/models/<pack>/``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RECOGNIZER_HINTS = ("w600k", "glint", "r50", "r100", "r18", "r34", "arcface", "rec")
"""Substrings of the recognition model's file name in insightface model packs."""


def find_recognizer(name_or_path: str, root: str | Path = "~/.insightface/models") -> Path:
    """A recognition ONNX path from a file path or a model-pack name (``buffalo_l``, ``antelopev2``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    pack = p if p.is_dir() else Path(root).expanduser() / name_or_path
    candidates = sorted(pack.glob("*.onnx")) if pack.is_dir() else []
    recs = [c for c in candidates if any(k in c.name for k in RECOGNIZER_HINTS)]
    if not recs:
        raise FileNotFoundError(
            f"no insightface recognition model for {name_or_path!r}: looked for a file, then for "
            f"{pack}/*.onnx named like w600k_r50.onnx or glintr100.onnx (found {[c.name for c in candidates]}). "
            f"Download the pack on a machine with network access and unpack it into {pack}/; "
            "idforge never downloads models."
        )
    if len(recs) > 1:
        log.warning(
            "%s: several recognition candidates %s; using %s", pack, [r.name for r in recs], recs[0].name
        )
    return recs[0]


class InsightFaceRecognizer:
    """insightface's ArcFaceONNX, fed whole batches of aligned RGB uint8 crops."""

    def __init__(self, name_or_path: str, root: str | Path = "~/.insightface/models", providers=None):
        from insightface.model_zoo import get_model

        self.path = find_recognizer(name_or_path, root)
        self.model = get_model(str(self.path), providers=providers or ["CPUExecutionProvider"])
        if self.model is None or getattr(self.model, "taskname", None) != "recognition":
            raise ValueError(
                f"{self.path}: insightface did not load this as a recognition model "
                f"(got {type(self.model).__name__}); pass the pack's w600k_r50.onnx/glintr100.onnx"
            )
        self.session = self.model.session
        self.input_name = self.session.get_inputs()[0].name
        batch_dim = self.model.input_shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.input_size = tuple(self.model.input_size)  # (width, height)

    @property
    def embedding_size(self) -> int:
        return int(self.model.output_shape[-1])

    def embed(self, aligned: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(B, 112, 112, 3) uint8 RGB aligned crops -> (B, D) float32, L2-normalised."""
        aligned = np.asarray(aligned)
        w, h = self.input_size
        if aligned.ndim != 4 or aligned.shape[1:] != (h, w, 3):
            raise ValueError(
                f"{self.path.name}: expected (B, {h}, {w}, 3) uint8 RGB aligned crops, got {aligned.shape}"
            )
        step = self.fixed_batch or max(1, int(batch_size))
        out = [np.zeros((0, self.embedding_size), np.float32)]
        for i in range(0, len(aligned), step):
            x = aligned[i : i + step].astype(np.float32).transpose(0, 3, 1, 2)  # (b, 3, h, w) RGB
            n = len(x)
            if self.fixed_batch and n < self.fixed_batch:  # a fixed-batch graph: pad the last chunk
                x = np.concatenate([x, np.zeros((self.fixed_batch - n, *x.shape[1:]), np.float32)])
            feats = np.asarray(self.model.forward(np.ascontiguousarray(x)), dtype=np.float32)[:n]
            out.append(feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12))
        return np.concatenate(out)
