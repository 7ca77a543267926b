"""idforge's identity components as diffusers pipeline components (``ModelMixin`` + ``ConfigMixin``).

``DiffusionPipeline.save_pretrained`` / ``from_pretrained`` save and load a component only when it
is a diffusers ``ModelMixin`` (or a transformers model, a scheduler, a tokenizer). These thin
wrappers give the three identity parts that shape, with their architecture in ``config.json`` and
their weights in safetensors, so an exported folder is self-contained offline:

- :class:`IdentityAdapterModel`: the Diff-ID adapter (:class:`~idforge.models.adapter.DiffIDAdapter`)
  plus, for the ``decoupled`` variant, the UNet's identity attention processors
  (``to_k_id``/``to_v_id``/``gate`` per cross-attention layer). The processors are saved here, not
  in ``unet/``, so ``UNet2DConditionModel.from_pretrained`` loads a plain UNet and the folder
  ``adapter/`` alone is the adapter-only export.
- :class:`ImageEncoderModel`: the open_clip vision tower (CLIP image embedding e_i of Diff-ID
  sec. 3.2), rebuilt from its open_clip model config; the text tower is not kept.
- :class:`FaceEncoderModel`: the ArcFace IResNet (e_arc), config = :class:`IResNetConfig`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from idforge.models.adapter import DiffIDAdapter
from idforge.models.attention import IdentityAttnProcessor, processor_key
from idforge.models.face.face_encoder import FaceEncoder
from idforge.models.face.iresnet import IResNet, IResNetConfig
from idforge.models.image_encoder import ClipImageEncoder, open_clip_model_config
from torch import nn

log = logging.getLogger(__name__)


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


class IdentityAdapterModel(ModelMixin, ConfigMixin):
    """The adapter and (decoupled variant) its attention processors, saved together."""

    @register_to_config
    def __init__(self, adapter_config: dict | None = None, processor_layers: list | None = None):
        """
        Args:
            adapter_config: keyword arguments of :class:`DiffIDAdapter` (its config).
            processor_layers: ``[processor name, hidden size, cross-attention dim]`` per identity
                attention processor (decoupled variant), in the UNet's order; None otherwise.
        """
        super().__init__()
        self.adapter = DiffIDAdapter(**(adapter_config or {}))
        self.processors = nn.ModuleDict(
            {
                processor_key(name): IdentityAttnProcessor(int(h), int(c))
                for name, h, c in processor_layers or []
            }
        )

    @property
    def variant(self) -> str:
        return self.adapter.config.variant

    @classmethod
    def from_parts(cls, adapter: DiffIDAdapter, unet: nn.Module) -> IdentityAdapterModel:
        """Wrap a trained adapter and the identity processors installed on ``unet`` (if any), sharing them."""
        procs = [
            (name, proc)
            for name, proc in unet.attn_processors.items()
            if isinstance(proc, IdentityAttnProcessor)
        ]
        model = cls(
            adapter_config=_public(adapter.config),
            processor_layers=[[n, p.hidden_size, p.cross_attention_dim] for n, p in procs] or None,
        )
        model.adapter = adapter  # shared, not copied: the pipeline uses the trained modules themselves
        for name, proc in procs:
            model.processors[processor_key(name)] = proc
        return model

    def forward(self, arcface_embeds, clip_embeds, text_states):
        return self.adapter(arcface_embeds, clip_embeds, text_states)


class ImageEncoderModel(ModelMixin, ConfigMixin):
    """The frozen open_clip vision tower behind :class:`ClipImageEncoder`'s interface."""

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 1024,
        vision_cfg: dict | None = None,
        quick_gelu: bool = False,
        image_size: int = 224,
        mean: tuple = (0.48145466, 0.4578275, 0.40821073),
        std: tuple = (0.26862954, 0.26130258, 0.27577711),
        tokens: str = "pooled",
    ):
        super().__init__()
        from types import SimpleNamespace

        from open_clip.model import _build_vision_tower

        visual = _build_vision_tower(int(embed_dim), dict(vision_cfg or {}), bool(quick_gelu))
        self.encoder = ClipImageEncoder(SimpleNamespace(visual=visual), image_size, mean, std, tokens=tokens)

    @classmethod
    def from_encoder(cls, encoder: ClipImageEncoder, spec: str) -> ImageEncoderModel:
        """Wrap a loaded :class:`ClipImageEncoder` whose open_clip spec is ``spec``, sharing it (nothing is
        copied: a training run's sample grids build a pipeline around the live model)."""
        cfg = (getattr(encoder, "open_clip_config", None) or open_clip_model_config(spec))["model_cfg"]
        with torch.device("meta"):  # a skeleton for the config only: the tower is shared, not rebuilt
            model = cls(
                embed_dim=int(cfg["embed_dim"]),
                vision_cfg=cfg["vision_cfg"],
                quick_gelu=bool(cfg.get("quick_gelu", False)),
                image_size=int(encoder.image_size),
                mean=tuple(float(v) for v in encoder.mean.flatten()),
                std=tuple(float(v) for v in encoder.std.flatten()),
                tokens=encoder.tokens,
            )
        model.encoder = encoder
        return model

    @property
    def output_dim(self) -> int:
        return self.encoder.output_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> e_i, (B, D) pooled or (B, N, W) patch tokens."""
        return self.encoder(images)


class FaceEncoderModel(ModelMixin, ConfigMixin):
    """The ArcFace IResNet (:class:`FaceEncoder`): aligned 112 x 112 crops -> L2-normalised embeddings."""

    @register_to_config
    def __init__(
        self,
        layers: tuple = (2, 2, 2, 2),
        widths: tuple = (64, 128, 256, 512),
        embedding_size: int = 512,
        input_size: int = 112,
        fp16: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        cfg = IResNetConfig(
            layers=tuple(layers),
            widths=tuple(widths),
            embedding_size=embedding_size,
            input_size=input_size,
            fp16=fp16,
            dropout=dropout,
        )
        self.encoder = FaceEncoder(IResNet(cfg))

    @classmethod
    def from_encoder(cls, encoder: FaceEncoder) -> FaceEncoderModel:
        """Wrap a loaded :class:`FaceEncoder`, sharing it (nothing is copied)."""
        with torch.device("meta"):
            model = cls(**asdict(encoder.backbone.config))
        model.encoder = encoder
        return model

    @property
    def embedding_size(self) -> int:
        return self.encoder.embedding_size

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        return self.encoder(aligned)
