"""Image feature extractors for FID, loaded from local files only, and a resumable feature cache.

``load_fid_features(spec)`` returns a callable images (N, 3, H, W) in [-1, 1] -> features (N, D):

- ``inception:PATH``: torch-fidelity's FID Inception-v3 (2048-d pool features) from the local
  weights file ``weights-inception-2015-12-05-6726825d.pth`` through torchmetrics' ``NoTrainInceptionV3``
  (the extractor of ``torchmetrics.image.FrechetInceptionDistance``); needs ``torch-fidelity``. The
  weights are the TF-slim FID Inception (Heusel et al.'s ``pool_3``) ported by torch-fidelity; fetch
  them once from its GitHub release
  (``github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth``)
  and pass the file; idforge never lets torch-fidelity download (with a path it loads that file; the
  file is first checked with ``torch.load(weights_only=True)`` because torch-fidelity unpickles it).
  The tests save a random-weight copy of the same network and load it through this code.
- ``clip:SPEC``: open_clip image embeddings (clean-fid's CLIP-FID), SPEC as in
  :class:`idforge.eval.clip_score.ClipModel`; the tests use a tiny random open_clip folder here.

:class:`FeatureCache` keeps one ``.pt`` file per (extractor, image set) under a folder, so a rerun
after an interruption recomputes only what is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def _inception(path: str) -> FeatureFn:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"inception:{path}: no such weights file; pass torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth (idforge never downloads weights)"
        )
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("inception FID features need torch-fidelity: pip install 'idforge[fid]'") from e
    try:  # torch-fidelity unpickles the file (weights_only=False): first check it holds tensors only
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"inception:{path}: not a plain state-dict checkpoint ({type(e).__name__}); pass torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth"
        ) from e
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(
            f"inception:{path}: not torch-fidelity's FID Inception-v3 state dict (no Mixed_7c layers); pass "
            "weights-inception-2015-12-05-6726825d.pth"
        )
    net = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(p)
    ).eval()

    @torch.no_grad()
    def fn(images: torch.Tensor) -> torch.Tensor:
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the FID protocol's uint8
        return net(x).reshape(x.shape[0], -1).double()

    return fn


def load_fid_features(spec: str, device: str | torch.device = "cpu") -> FeatureFn:
    """A FID feature extractor from ``inception:PATH`` or ``clip:SPEC`` (see the module docstring)."""
    kind, _, arg = str(spec).partition(":")
    if kind == "inception" and arg:
        return _inception(arg)
    if kind == "clip" and arg:
        from .clip_score import ClipModel

        return ClipModel(arg, device).image_features
    raise ValueError(f"FID features {spec!r}: use 'inception:PATH' (local weights) or 'clip:SPEC'")


def images_key(images: torch.Tensor) -> str:
    """A content hash of an image batch (stable across runs: same pixels, same key)."""
    q = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    return hashlib.sha1(q.numpy().tobytes() + str(tuple(q.shape)).encode()).hexdigest()[:16]


class FeatureCache:
    """Features of image sets cached on disk by (extractor name, pixel hash)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None
        self.hits = 0
        self.misses = 0

    def get(self, name: str, images: torch.Tensor, fn: FeatureFn) -> torch.Tensor:
        if self.folder is None:
            self.misses += 1
            return fn(images)
        path = self.folder / f"{name}-{images_key(images)}.pt"
        if path.is_file():
            self.hits += 1
            return torch.load(path, weights_only=True)
        self.misses += 1
        feats = fn(images).cpu()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(feats, tmp)
        tmp.replace(path)
        return feats
