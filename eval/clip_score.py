"""CLIP score (Hessel et al. 2021; torchmetrics' ``CLIPScore`` definition): 100 * max(cos, 0) between
CLIP embeddings of an image and a text (image-text) or of two images (image-image), through open_clip.

The model loads with :func:`idforge.models.image_encoder.load_open_clip` from a local folder
(``open_clip_config.json`` + weights, e.g. ViT-H-14 for the papers' figures, or the tiny random
folder that ``idforge.models.zoo.build_tiny`` writes for the tests) or ``ARCH@FILE``; nothing downloads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ClipModel:
    """open_clip image / text embeddings (L2-normalised) for images (N, 3, H, W) in [-1, 1]."""

    def __init__(self, spec: str, device: str | torch.device = "cpu"):
        from idforge.models.image_encoder import load_open_clip, load_open_clip_tokenizer

        self.spec = str(spec)
        self.model, _preprocess = load_open_clip(spec)
        self.model = self.model.to(device).eval()
        self.tokenizer = load_open_clip_tokenizer(spec)
        self.device = torch.device(device)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        import open_clip

        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = (images[i : i + batch_size].float().to(self.device) + 1) / 2  # [0, 1]
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
            x = (x - self.mean.to(x)) / self.std.to(x)
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


def clip_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row CLIP score 100 * max(cos(a, b), 0) of (N, D) embeddings (torchmetrics' definition)."""
    return 100 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp_min(0)
