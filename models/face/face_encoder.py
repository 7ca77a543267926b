"""FaceEncoder: a differentiable ArcFace network with one interface, from any of its checkpoint forms.

``forward`` maps aligned 112 x 112 crops in [-1, 1] to L2-normalised 512-d embeddings and stays
differentiable with respect to its input (the identity loss of Diff-ID sec. 3.3 back-propagates
through it while its weights stay frozen). :meth:`FaceEncoder.from_pretrained` loads, all through
the same :class:`~idforge.models.face.iresnet.IResNet` code path:

- an idforge folder (``config.json`` + ``model.safetensors``, written by :meth:`save_pretrained`;
  the safetensors keys are exactly arcface_torch's ``backbone.pth`` keys);
- an arcface_torch ``backbone.pth`` (or training checkpoint) state dict, read with
  ``torch.load(weights_only=True)``, or a bare ``.safetensors`` state dict; stages and widths are
  inferred from the tensor shapes unless ``arch="r50"`` etc. is given;
- an insightface recognition ``.onnx`` file (buffalo_l ``w600k_r50.onnx``, antelopev2
  ``glintr100.onnx``), converted to torch by :mod:`idforge.models.face.onnx_convert`;
- a folder holding one of the two previous kinds (e.g. an insightface model-pack folder).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .iresnet import IResNet, IResNetConfig, clean_state_dict, config_from_state_dict, load_arcface_state_dict

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class FaceEncoder(nn.Module):
    def __init__(self, backbone: IResNet):
        super().__init__()
        self.backbone = backbone

    @property
    def embedding_size(self) -> int:
        return int(self.backbone.config.embedding_size)

    @property
    def input_size(self) -> int:
        return int(self.backbone.config.input_size)

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in [-1, 1] -> (B, 512) float32, L2-normalised."""
        s = self.input_size
        if aligned.dim() != 4 or aligned.shape[1:] != (3, s, s):
            raise ValueError(
                f"FaceEncoder expects aligned (B, 3, {s}, {s}) crops in [-1, 1], got "
                f"{tuple(aligned.shape)}; align with idforge.models.face.align_torch.warp_to_template"
            )
        weight = self.backbone.conv1.weight
        return F.normalize(self.backbone(aligned.to(weight.device, weight.dtype)).float(), dim=-1)

    def freeze(self) -> FaceEncoder:
        """Eval mode and no weight gradients; the output stays differentiable w.r.t. the input."""
        self.requires_grad_(False)
        return self.eval()

    @torch.no_grad()
    def embed_uint8(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(B, 112, 112, 3) uint8 RGB aligned crops -> (B, 512) float32 L2-normalised (eval mode)."""
        images = np.asarray(images)
        s = self.input_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ValueError(
                f"embed_uint8 expects (B, {s}, {s}, 3) uint8 RGB crops, got {images.dtype} "
                f"{images.shape}; align with idforge.data_pipeline.align.align_face first"
            )
        if batch_size < 1:
            raise ValueError(f"embed_uint8: batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        device = self.backbone.conv1.weight.device
        out = [np.zeros((0, self.embedding_size), np.float32)]
        try:
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (b, 3, s, s), (x / 255 - 0.5) / 0.5
                out.append(self(x).cpu().numpy())
        finally:
            self.train(was_training)
        return np.concatenate(out).astype(np.float32)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (arcface_torch ``backbone.pth`` keys)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"arch": "iresnet", **asdict(self.backbone.config)}
        (folder / CONFIG).write_text(json.dumps(cfg, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        save_file(state, str(folder / WEIGHTS))
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, arch: str | None = None) -> FaceEncoder:
        """Load a frozen encoder from any form listed in the module docstring."""
        path = Path(path).expanduser()
        if path.is_dir():
            return cls._from_folder(path, arch)
        if not path.is_file():
            raise FileNotFoundError(
                f"face encoder {path} not found: pass an idforge face-encoder folder, an arcface_torch "
                "backbone.pth, or an insightface recognition .onnx (e.g. unpack the antelopev2 pack into "
                "~/.insightface/models/antelopev2/); idforge never downloads weights"
            )
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            from .onnx_convert import onnx_to_iresnet

            model, report = onnx_to_iresnet(path)
            log.info("face encoder from ONNX %s: %s", path, report["arch"])
            return cls(model).freeze()
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return cls._from_state_dict(load_file(str(path)), arch, str(path))
        if suffix in TORCH_SUFFIXES:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickled objects beyond tensors are refused, never executed
                raise ValueError(
                    f"{path}: not loadable with torch.load(weights_only=True) ({e}); save the "
                    "backbone's state_dict() only"
                ) from e
            return cls._from_state_dict(state, arch, str(path))
        raise ValueError(
            f"{path}: unsupported face-encoder file {suffix or '(no suffix)'!r}; expected a folder, "
            f"an .onnx recogniser, a .safetensors state dict or a {'/'.join(TORCH_SUFFIXES)} "
            "arcface_torch checkpoint"
        )

    @classmethod
    def _from_state_dict(cls, state, arch: str | None, source: str) -> FaceEncoder:
        state = clean_state_dict(state, source)
        cfg = config_from_state_dict(state, source)
        if arch is not None:
            named = IResNetConfig.named(
                arch, widths=cfg.widths, embedding_size=cfg.embedding_size, input_size=cfg.input_size
            )
            if named.layers != cfg.layers:
                raise ValueError(
                    f"{source}: arch={arch!r} has layers {named.layers} but the weights have "
                    f"{cfg.layers}; drop arch= to infer it"
                )
            cfg = named
        model = IResNet(cfg)
        load_arcface_state_dict(model, state, source)
        log.info("face encoder from %s: layers %s, widths %s", source, cfg.layers, cfg.widths)
        return cls(model).freeze()

    @classmethod
    def _from_folder(cls, folder: Path, arch: str | None) -> FaceEncoder:
        cfg_path, weights = folder / CONFIG, folder / WEIGHTS
        if cfg_path.is_file() and weights.is_file():
            from safetensors.torch import load_file

            cfg = json.loads(cfg_path.read_text())
            kind = cfg.pop("arch", "iresnet")
            if kind != "iresnet":
                raise ValueError(
                    f"{cfg_path}: face-encoder architecture {kind!r} is not supported (only 'iresnet')"
                )
            known = {f.name for f in fields(IResNetConfig)}
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise ValueError(
                    f"{cfg_path}: unknown IResNetConfig keys {unknown}; expected a subset of {sorted(known)}"
                )
            model = IResNet(IResNetConfig(**cfg))
            load_arcface_state_dict(model, load_file(str(weights)), str(weights))
            return cls(model).freeze()
        candidates = [p for s in TORCH_SUFFIXES for p in sorted(folder.glob(f"backbone*{s}"))]
        if not candidates:
            from .insightface_encoder import RECOGNIZER_HINTS

            candidates = [
                p for p in sorted(folder.glob("*.onnx")) if any(h in p.name for h in RECOGNIZER_HINTS)
            ]
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"{folder}: a face-encoder folder needs {CONFIG} + {WEIGHTS} (FaceEncoder.save_pretrained), "
                f"or exactly one backbone*.pth or recognition .onnx; found {[p.name for p in candidates]}"
            )
        return cls.from_pretrained(candidates[0], arch)
