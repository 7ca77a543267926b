"""Identity embedders for curation: ArcFace on aligned 112 x 112 crops, L2-normalised, stored float16.

``make_embedder(spec)``: an idforge face-encoder folder, an arcface_torch ``backbone.pth``, or an
insightface recognition ``.onnx`` (all through :class:`idforge.models.face_encoder.FaceEncoder`),
or ``"none"`` (no embeddings; identity clustering then needs provided identities).
"""

from __future__ import annotations

import numpy as np


class Embedder:
    def __init__(self, encoder, batch_size: int = 64, device: str = "cpu"):
        self.encoder = encoder.to(device)
        self.batch_size = batch_size

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """(B, 112, 112, 3) uint8 -> (B, 512) float32, L2-normalised."""
        return self.encoder.embed_uint8(aligned, batch_size=self.batch_size)


def make_embedder(spec: str | None, batch_size: int = 64, device: str = "cpu") -> Embedder | None:
    if spec in (None, "", "none"):
        return None
    from idforge.models.face_encoder import FaceEncoder

    return Embedder(FaceEncoder.from_pretrained(spec), batch_size=batch_size, device=device)


def to_storage(emb: np.ndarray) -> np.ndarray:
    return emb.astype(np.float16)
