"""Train a face encoder (IResNet + ArcFace margin head) on labelled aligned crops.

Used by the demo and by curation tests to obtain an identity embedder for SynthID when no
pretrained ArcFace applies (real runs load insightface/arcface_torch weights instead). It is a
small CPU job inside the demo and curation, so a plain torch loop keeps it light and dependency
free; large-scale ArcFace training (partial FC, multi-GPU) is out of scope.

Loss: cross-entropy over ArcFace logits (Deng et al. 2019, eq. 3, :class:`ArcFaceHead`); AdamW with
a one-cycle schedule. Augmentation: horizontal flips (faces are close enough to symmetric that a
mirrored face keeps its identity; arcface_torch trains with the same flip) and a small brightness
jitter. Deterministic for a given seed on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from idforge.models.face.arcface_head import ArcFaceHead
from idforge.models.face.face_encoder import FaceEncoder
from idforge.models.face.iresnet import IResNet, IResNetConfig
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

DEFAULT_CONFIG = IResNetConfig(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128))


def _to_tensor(images: np.ndarray, size: int = 112) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"expected (N, {size}, {size}, 3) uint8 aligned crops, got {images.dtype} {images.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _item_tensor(image, size: int) -> torch.Tensor:
    """One dataset image: (S, S, 3) uint8 array/tensor, or (3, S, S) float tensor in [-1, 1]."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.shape != (3, size, size):
            raise ValueError(
                f"dataset float images must be (3, {size}, {size}) in [-1, 1], got {tuple(image.shape)}"
            )
        return image.float()
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return _to_tensor(arr[None], size)[0]


def _collate(size: int):
    def collate(items):
        xs, ys = zip(*[(it[0], it[1]) for it in items])
        return torch.stack([_item_tensor(x, size) for x in xs]), torch.as_tensor([int(y) for y in ys])

    return collate


def _dataset_labels(dataset: Dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def _augment(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(xb), generator=g) < 0.5
    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    gain = 1 + 0.2 * (torch.rand(len(xb), 1, 1, 1, generator=g) - 0.5)  # brightness x [0.9, 1.1]
    return (xb * gain).clamp(-1, 1)


def fit_face_encoder(
    images: np.ndarray | Dataset,
    labels=None,
    config: IResNetConfig | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    s: float = 32.0,
    m: float = 0.3,
    augment: bool = True,
    progress: Callable[[int, float], None] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[FaceEncoder, dict]:
    """Fit on labelled aligned crops; returns (frozen encoder, history with per-epoch loss/accuracy).

    ``images`` is (N, 112, 112, 3) uint8 with ``labels`` (N,), or a torch ``Dataset`` of
    ``(image, label)`` items (image (112, 112, 3) uint8 or (3, 112, 112) float in [-1, 1]; ``labels``
    then defaults to the dataset's). Labels are any hashable ids, mapped to classes in sorted order.
    ``s``/``m`` are the ArcFace scale and margin (smaller than the paper's 64/0.5, which suit
    thousands of identities, not a handful). ``progress(epoch, loss)`` is called after each epoch.
    """
    if epochs < 1 or batch_size < 2:
        raise ValueError(
            f"fit_face_encoder: need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}"
        )
    cfg = config or DEFAULT_CONFIG
    is_dataset = isinstance(images, Dataset)
    if labels is None:
        if not is_dataset:
            raise ValueError("fit_face_encoder: labels are required for an image array")
        labels = _dataset_labels(images)
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"fit_face_encoder: {len(images)} images but {len(labels)} labels")
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("fit_face_encoder: need at least 2 identities to train a face encoder")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    y = torch.from_numpy(y).long()
    model = IResNet(cfg).to(device)
    head = ArcFaceHead(cfg.embedding_size, len(classes), s=s, m=m).to(device)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    steps = max(1, epochs * ((len(labels) + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)

    if is_dataset:
        class_of = {c: i for i, c in enumerate(classes.tolist())}
        loader = DataLoader(
            images,
            batch_size=batch_size,
            shuffle=True,
            generator=g,
            num_workers=0,
            collate_fn=_collate(cfg.input_size),
        )

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for xb, lb in loader:
                yield xb, torch.as_tensor([class_of[v] for v in lb.tolist()])
    else:
        x = _to_tensor(images, cfg.input_size)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                yield x[idx], y[idx]

    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    model.train()
    for epoch in range(epochs):
        total, correct, count = 0.0, 0, 0
        for xb, yb in batches():
            if len(yb) < 2:  # BatchNorm needs two samples
                continue
            if augment:
                xb = _augment(xb, g)
            xb, yb = xb.to(device), yb.to(device)
            logits = head(model(xb), yb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            count += len(yb)
        history["loss"].append(total / max(count, 1))
        history["accuracy"].append(correct / max(count, 1))
        log.info(
            "face encoder epoch %d: loss %.3f, margin accuracy %.3f",
            epoch,
            history["loss"][-1],
            history["accuracy"][-1],
        )
        if progress:
            progress(epoch, history["loss"][-1])
    return FaceEncoder(model.cpu()).freeze(), history


@torch.no_grad()
def verification_scores(encoder: FaceEncoder, images: np.ndarray, labels) -> dict:
    """Mean same-identity and different-identity cosine over all pairs, and the ROC AUC of telling
    them apart (1.0: every same pair is closer than every different pair; 0.5: chance)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"verification_scores: {len(images)} images but {len(labels)} labels")
    emb = encoder.embed_uint8(images)
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(same), k=1)  # each unordered pair once
    pos, neg = sim[same & upper], sim[~same & upper]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("verification_scores needs at least two identities, one of them with two images")
    scores = np.concatenate([pos, neg])
    truth = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    return {
        "same_mean": float(pos.mean()),
        "diff_mean": float(neg.mean()),
        "auc": float(roc_auc_score(truth, scores)),
    }
