"""Train a face encoder (IResNet + ArcFace margin head) on labelled aligned crops.

Used by the demo and by curation tests to obtain an identity embedder for SynthID when no
pretrained ArcFace applies (real runs load insightface/arcface_torch weights instead). It is a
small CPU job, so a plain torch loop keeps it light; large-scale ArcFace training is out of scope.
Loss: cross-entropy over ArcFace logits (Deng et al. 2019, eq. 3); AdamW with a cosine schedule;
horizontal flips and brightness jitter as augmentation. Deterministic for a given seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from idforge.models.arcface_head import ArcFaceHead
from idforge.models.face_encoder import FaceEncoder
from idforge.models.iresnet import IResNet, IResNetConfig

log = logging.getLogger(__name__)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1:] != (112, 112, 3):
        raise ValueError(f"expected (N, 112, 112, 3) uint8 aligned crops, got {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def fit_face_encoder(images: np.ndarray, labels, config: IResNetConfig | None = None, epochs: int = 10,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, s: float = 32.0, m: float = 0.3,
                     augment: bool = True, progress: Callable[[int, float], None] | None = None
                     ) -> tuple[FaceEncoder, dict]:
    """Fit on (N, 112, 112, 3) uint8 crops with identity ``labels``; returns (encoder, history)."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("need at least 2 identities to train a face encoder")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = _to_tensor(images)
    y = torch.from_numpy(y).long()
    model = IResNet(config or IResNetConfig(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128)))
    head = ArcFaceHead(model.config.embedding_size, len(classes), s=s, m=m)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    steps = max(1, epochs * ((len(x) + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    history = {"loss": [], "accuracy": []}
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total, correct, count = 0.0, 0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue
            xb, yb = x[idx], y[idx]
            if augment:
                flip = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                gain = 1 + 0.2 * (torch.rand(len(idx), 1, 1, 1, generator=g) - 0.5)
                xb = (xb * gain).clamp(-1, 1)
            logits = head(model(xb), yb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            count += len(idx)
        history["loss"].append(total / max(count, 1))
        history["accuracy"].append(correct / max(count, 1))
        log.info("face encoder epoch %d: loss %.3f, margin accuracy %.3f", epoch, history["loss"][-1],
                 history["accuracy"][-1])
        if progress:
            progress(epoch, history["loss"][-1])
    return FaceEncoder(model).freeze(), history


@torch.no_grad()
def verification_scores(encoder: FaceEncoder, images: np.ndarray, labels) -> dict:
    """Mean same-identity and different-identity cosine, and the ROC AUC of telling them apart."""
    from sklearn.metrics import roc_auc_score

    emb = torch.from_numpy(encoder.embed_uint8(images))
    labels = np.asarray(labels)
    sim = (emb @ emb.T).numpy()
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    pos, neg = sim[same & off], sim[~same]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("verification needs at least two identities with two images each")
    scores = np.concatenate([pos, neg])
    truth = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    return {"same_mean": float(pos.mean()), "diff_mean": float(neg.mean()), "auc": float(roc_auc_score(truth, scores))}
