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


def load_judge(path) -> tuple[torch.nn.Module, str]:
    """(face encoder, its name) for ``--judge``: an idforge face-encoder folder, an arcface_torch
    ``backbone.pth`` or an insightface recognition ``.onnx``, all through ``FaceEncoder.from_pretrained``."""
    from pathlib import Path

    from idforge.models.face.face_encoder import FaceEncoder

    p = Path(path).expanduser()
    return FaceEncoder.from_pretrained(p).eval(), str(p)


@torch.no_grad()
def embed_generated(
    face_encoder: torch.nn.Module,
    images: torch.Tensor,
    detector=None,
    template_landmarks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, D) of generated images with NaN rows where no face was found, and the mask.

    With a ``detector`` (:class:`idforge.data_pipeline.detect.Detector`) each image's largest face
    gives the landmarks; an image with none is counted as undetected (never silently dropped).
    Without one, ``template_landmarks`` (5, 2) are used for every image (models trained on aligned
    crops generate aligned faces) and every image counts as detected.
    """
    n = images.shape[0]
    if detector is None:
        if template_landmarks is None:
            raise ValueError("embed_generated needs a detector or template landmarks")
        lms = template_landmarks.float().expand(n, 5, 2)
        return embed_faces(face_encoder, images, lms), torch.ones(n, dtype=torch.bool)
    u8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    dets = detector.detect_batch(list(u8))
    found = torch.tensor([len(d) > 0 for d in dets], dtype=torch.bool)
    if found.any():
        lms = torch.stack(
            [torch.as_tensor(max(d, key=lambda f: f.area).landmarks) for d in dets if len(d) > 0]
        )
        emb = embed_faces(face_encoder, images[found], lms)
        out = torch.full((n, emb.shape[1]), float("nan"))
        out[found] = emb.cpu()
    else:
        size = getattr(face_encoder, "embedding_size", 512)
        out = torch.full((n, int(size)), float("nan"))
    return out, found
