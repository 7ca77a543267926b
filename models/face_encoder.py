"""FaceEncoder: a differentiable ArcFace network with one interface, from any of its checkpoint forms.

``forward`` maps aligned 112 x 112 crops in [-1, 1] to L2-normalised 512-d embeddings and stays
differentiable with respect to its input (the identity loss of Diff-ID sec. 3.3 back-propagates
through it while its weights stay frozen). :meth:`FaceEncoder.from_pretrained` loads

- an idforge folder (``config.json`` + ``model.safetensors``, written by :meth:`save_pretrained`);
- an arcface_torch ``backbone.pth`` state dict (``torch.load(weights_only=True)``; stages and widths
  inferred from the tensor shapes);
- an insightface recognition ``.onnx`` file (e.g. antelopev2 ``glintr100.onnx``), converted to torch
  by :mod:`idforge.models.onnx_convert`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .iresnet import IResNet, IResNetConfig, config_from_state_dict

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class FaceEncoder(nn.Module):
    def __init__(self, backbone: IResNet):
        super().__init__()
        self.backbone = backbone

    @property
    def embedding_size(self) -> int:
        return int(self.backbone.config.embedding_size)

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) in [-1, 1] -> (B, 512) L2-normalised."""
        return F.normalize(self.backbone(aligned).float(), dim=-1)

    def freeze(self) -> FaceEncoder:
        self.requires_grad_(False)
        return self.eval()

    @torch.no_grad()
    def embed_uint8(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(B, 112, 112, 3) uint8 RGB crops -> (B, 512) float32 L2-normalised."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"embed_uint8 expects (B, H, W, 3) uint8 crops, got shape {images.shape}")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(self(x).cpu().numpy())
        self.train(was_training)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.embedding_size), np.float32)

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"arch": "iresnet", **asdict(self.backbone.config)}
        (folder / CONFIG).write_text(json.dumps(cfg, indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.backbone.state_dict().items()}, folder / WEIGHTS)
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, arch: str | None = None) -> FaceEncoder:
        path = Path(path).expanduser()
        if path.is_dir():
            cfg_path, weights = path / CONFIG, path / WEIGHTS
            if not cfg_path.is_file() or not weights.is_file():
                raise FileNotFoundError(f"{path}: a face-encoder folder needs {CONFIG} and {WEIGHTS} "
                                        "(written by FaceEncoder.save_pretrained)")
            from safetensors.torch import load_file

            cfg = json.loads(cfg_path.read_text())
            if cfg.pop("arch", "iresnet") != "iresnet":
                raise ValueError(f"{cfg_path}: unsupported face-encoder architecture")
            model = IResNet(IResNetConfig(**cfg))
            model.load_state_dict(load_file(weights), strict=True)
            return cls(model).freeze()
        if not path.is_file():
            raise FileNotFoundError(
                f"face encoder {path} not found: pass an idforge face-encoder folder, an arcface_torch "
                "backbone.pth, or an insightface recognition .onnx (e.g. place the antelopev2 pack under "
                "~/.insightface/models/antelopev2/)")
        if path.suffix == ".onnx":
            from .onnx_convert import onnx_to_iresnet

            model, _ = onnx_to_iresnet(path)
            return cls(model).freeze()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        cfg = IResNetConfig.named(arch) if arch else config_from_state_dict(state)
        model = IResNet(cfg)
        model.load_state_dict(state, strict=True)
        return cls(model).freeze()
