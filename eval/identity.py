"""Face similarity (FS), Diff-ID sec. 4: cosine of ArcFace embeddings of two face images.

FS(a, b) = <ArcFace(align(a)), ArcFace(align(b))> with L2-normalised embeddings; the paper reports
it in percent (Table 1: 72.68 for Diff-ID). Faces are aligned to the 112 x 112 ArcFace template
with their 5-point landmarks before embedding.
"""

from __future__ import annotations

import torch
from idforge.models.face.align_torch import warp_to_template


@torch.no_grad()
def embed_faces(
    face_encoder: torch.nn.Module, images: torch.Tensor, landmarks: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """L2-normalised ArcFace embeddings (N, 512) of images (N, 3, H, W) in [-1, 1]."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        crops = warp_to_template(
            images[i : i + batch_size].float(), landmarks[i : i + batch_size].float(), out_size=112
        )
        e = face_encoder(crops).float()
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (N, D) embeddings."""
    return (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)
