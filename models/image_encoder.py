"""CLIP image encoder (open_clip) behind one interface: e_i = CLIP_image(I) of Diff-ID sec. 3.2.

Diff-ID feeds the CLIP image embedding of the reference face to the adapter. ``tokens="pooled"``
returns the projected image embedding (B, D) (1024 for ViT-H-14); ``tokens="patch"`` returns the
last layer's patch tokens (B, N, W) as IP-Adapter-Plus-style variants use. The encoder is frozen.

Specs accepted by :meth:`ClipImageEncoder.from_pretrained` (all resolved by open_clip itself):
``local-dir:/path`` or a plain folder (``open_clip_config.json`` + weights), ``hf-hub:org/repo``,
or ``ARCH@TAG_OR_FILE`` such as ``ViT-H-14@laion2b_s32b_b79k`` or ``ViT-H-14@/ckpt/open_clip.bin``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def load_open_clip(spec: str):
    """(model, preprocess) of an open_clip spec; the spec forms are listed in the module docstring.

    A plain path must be a folder (``open_clip_config.json`` + weights); ``hf-hub:`` names resolve
    from the local cache only when the machine is offline.
    """
    import open_clip

    spec = str(spec)
    if "@" in spec and not spec.startswith(("local-dir:", "hf-hub:")):
        arch, pretrained = spec.split("@", 1)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        return model, preprocess
    if not spec.startswith(("local-dir:", "hf-hub:")):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"open_clip model {spec!r}: not a folder. Pass 'local-dir:/path' (a folder with "
                "open_clip_config.json and weights), 'hf-hub:org/repo', or 'ARCH@TAG_OR_FILE' "
                "(e.g. ViT-H-14@laion2b_s32b_b79k)."
            )
        spec = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model, preprocess


def open_clip_model_config(spec: str) -> dict:
    """The open_clip config ``{"model_cfg": ..., "preprocess_cfg": ...}`` of an image-encoder spec
    (``local-dir:``/folder, ``hf-hub:`` from the local cache, or ``ARCH@TAG``)."""
    import open_clip

    spec = str(spec)
    if spec.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(spec[7:], "open_clip_config.json")).read_text())
    if "@" in spec and not spec.startswith("local-dir:"):
        cfg = open_clip.get_model_config(spec.split("@", 1)[0])
        if cfg is None:
            raise ValueError(f"open_clip has no model config named {spec.split('@', 1)[0]!r} ({spec})")
        return {"model_cfg": cfg, "preprocess_cfg": {}}
    folder = Path(spec.removeprefix("local-dir:")).expanduser()
    path = folder / "open_clip_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no open_clip config; the image encoder must be an open_clip folder")
    return json.loads(path.read_text())


def load_open_clip_tokenizer(spec: str):
    """The text tokenizer that belongs to an open_clip spec (CLIP's bundled BPE for local folders)."""
    import open_clip

    spec = str(spec)
    if "@" in spec and not spec.startswith(("local-dir:", "hf-hub:")):
        return open_clip.get_tokenizer(spec.split("@", 1)[0])
    if not spec.startswith(("local-dir:", "hf-hub:")):
        spec = f"local-dir:{Path(spec).expanduser()}"
    return open_clip.get_tokenizer(spec)


class ClipImageEncoder(nn.Module):
    def __init__(self, model: nn.Module, image_size: int, mean, std, tokens: str = "pooled"):
        super().__init__()
        if tokens not in ("pooled", "patch"):
            raise ValueError(f"tokens must be 'pooled' or 'patch', got {tokens!r}")
        self.visual = model.visual
        self.tokens = tokens
        self.image_size = int(image_size)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if tokens == "patch":
            self.visual.output_tokens = True
        self.requires_grad_(False)
        self.eval()

    @property
    def output_dim(self) -> int:
        if self.tokens == "pooled":
            return int(self.visual.output_dim)
        return int(self.visual.transformer.width)

    def train(self, mode: bool = True):  # frozen encoder stays in eval mode
        super().train(mode)
        self.visual.eval()
        return self

    @classmethod
    def from_pretrained(cls, spec: str, tokens: str = "pooled") -> ClipImageEncoder:
        import open_clip

        model, _ = load_open_clip(spec)
        cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
        size = cfg.get("size", model.visual.image_size)
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
        encoder = cls(model, image_size=size, mean=mean, std=std, tokens=tokens)
        # kept so a pipeline can wrap this live encoder after its source folder is gone
        encoder.open_clip_config = open_clip_model_config(spec)
        return encoder

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP input (resized, mean/std normalised)."""
        x = (images.float() + 1.0) / 2.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )  # antialias: a 512 px face minified to 224 px must be low-passed first
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).to(next(self.visual.parameters()).dtype)
        out = self.visual(x)
        if self.tokens == "patch":
            _, tokens = out  # (B, N, W)
            return tokens
        return out  # (B, D)
