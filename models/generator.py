"""The identity-conditioned generator: SD1.5 UNet + codec + CLIP text encoder + identity encoders + adapter.

Composition, not a fork (ARCHITECTURE.md): diffusers' ``UNet2DConditionModel`` is used as is; the
Diff-ID adapter (:mod:`idforge.models.adapter`) turns (ArcFace, CLIP image, CLIP text) embeddings
into the context the UNet's cross-attention attends to (Diff-ID sec. 3.2), or, for the
``decoupled`` variant, identity tokens that reach the UNet through ``IdentityAttnProcessor``s
passed explicitly via ``cross_attention_kwargs``.

Frozen (Diff-ID appendix A.1): VAE, CLIP text and image encoders, ArcFace. Trainable: the adapter
and, when ``train_unet`` is set (Diff-ID fine-tunes the UNet), the UNet. One predicate,
:meth:`IdentityGenerator.is_trainable`, both marks parameters trainable and filters what
:meth:`IdentityGenerator.trainable_state_dict` saves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import zoo as zoo_lib
from .adapter import DiffIDAdapter, IdentityConditioning, check_adapter_options
from .face.align_torch import warp_to_template

log = logging.getLogger(__name__)


@dataclass
class GeneratorConfig:
    """What to build: component sources, adapter options, and which parts train."""

    zoo: zoo_lib.ZooSpec = field(default_factory=zoo_lib.ZooSpec)
    adapter: dict = field(default_factory=dict)
    """Keyword arguments of :class:`DiffIDAdapter` (variant, softmax, ...); the input widths are
    filled from the loaded components."""
    train_unet: bool = True
    """Fine-tune the whole UNet (Diff-ID). False: only the adapter (and its attention processors) train."""
    gradient_checkpointing: bool = False
    adapter_path: str | None = None
    """Load adapter weights saved by ``save_pretrained`` (a folder) instead of initialising them."""

    def __post_init__(self):
        if isinstance(self.zoo, dict):
            self.zoo = zoo_lib.ZooSpec(**self.zoo)
        self.zoo = zoo_lib.resolve(self.zoo)

    def validate(self) -> None:
        """Check paths and option combinations without loading a model; errors name the key
        (``generator.zoo.face_encoder: ...``)."""
        try:
            self.zoo.validate()
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"generator.{e}") from None
        if self.adapter_path is not None:
            if not (Path(self.adapter_path).expanduser() / "config.json").is_file():
                raise FileNotFoundError(
                    f"generator.adapter_path: {self.adapter_path} is not an adapter folder (no "
                    "config.json); point it at a folder written by DiffIDAdapter.save_pretrained"
                )
        else:
            check_adapter_options(dict(self.adapter), key="generator.adapter")


class IdentityGenerator(nn.Module):
    """Holds the components and computes the conditioning and the UNet prediction."""

    def __init__(
        self,
        unet,
        codec,
        text_encoder,
        tokenizer,
        image_encoder,
        face_encoder,
        adapter,
        scheduler,
        train_unet: bool = True,
    ):
        super().__init__()
        self.unet = unet
        self.codec = codec
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        self.face_encoder = face_encoder
        self.adapter = adapter
        self.scheduler = scheduler
        self.train_unet = train_unet
        for frozen in (self.codec, self.text_encoder, self.image_encoder, self.face_encoder):
            frozen.requires_grad_(False)
            frozen.eval()
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable(name))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: GeneratorConfig) -> IdentityGenerator:
        cfg.validate()  # paths and options first: a bad config fails before any weights load
        spec = cfg.zoo
        unet = zoo_lib.load_unet(spec)
        codec = zoo_lib.load_codec(spec)
        text_encoder = zoo_lib.load_text_encoder(spec)
        tokenizer = zoo_lib.load_tokenizer(spec)
        scheduler = zoo_lib.load_scheduler(spec)
        image_encoder = zoo_lib.load_image_encoder(spec)
        face_encoder = zoo_lib.load_face_encoder(spec)
        if cfg.adapter_path:
            adapter = DiffIDAdapter.from_pretrained(cfg.adapter_path)
        else:
            kwargs = dict(cfg.adapter)
            kwargs.setdefault("arcface_dim", int(face_encoder.embedding_size))
            kwargs.setdefault("clip_dim", int(image_encoder.output_dim))
            kwargs.setdefault("text_dim", int(text_encoder.config.hidden_size))
            kwargs.setdefault("cross_attention_dim", int(unet.config.cross_attention_dim))
            kwargs.setdefault("clip_tokens", "patch" if spec.image_tokens == "patch" else "pooled")
            adapter = DiffIDAdapter(**kwargs)
        if adapter.config.variant == "decoupled":
            from .attention import install_identity_processors

            install_identity_processors(unet, cross_attention_dim=int(unet.config.cross_attention_dim))
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        model = cls(
            unet,
            codec,
            text_encoder,
            tokenizer,
            image_encoder,
            face_encoder,
            adapter,
            scheduler,
            train_unet=cfg.train_unet,
        )
        model.zoo_spec = spec
        return model

    # ------------------------------------------------------------------ trainable parts
    def is_trainable(self, name: str) -> bool:
        """The one predicate for "trains and is saved": adapter, identity attention processors,
        and the UNet when ``train_unet``."""
        if name.startswith("adapter."):
            return True
        if name.startswith("unet."):
            return self.train_unet or ".processor." in name
        return False

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if self.is_trainable(k)}

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.codec, self.text_encoder, self.image_encoder, self.face_encoder):
            frozen.eval()
        return self

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """e_t = CLIP_text(A): (B, 77, D) last hidden states, as SD1.5 conditions on."""
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    @torch.no_grad()
    def identity_embeds(
        self,
        references: torch.Tensor,
        landmarks: torch.Tensor | None = None,
        arcface_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_arc, e_i) of the reference images (B, 3, H, W) in [-1, 1].

        e_arc: ArcFace of the 112 x 112 crop aligned with the 5 landmarks (pixel coordinates of
        ``references``), unless precomputed embeddings are given (curated shards store them).
        """
        if arcface_embeds is None:
            if landmarks is None:
                raise ValueError(
                    "identity_embeds needs the references' 5-point landmarks or precomputed "
                    "ArcFace embeddings"
                )
            arcface_embeds = self.face_embeds(references, landmarks)
        clip_embeds = self.image_encoder(references)
        return arcface_embeds.float(), clip_embeds.float()

    def face_embeds(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """ArcFace embeddings (B, 512) of ``images`` (B, 3, H, W) in [-1, 1], each cut to the 112 x 112
        template with its 5 landmarks (pixel coordinates)."""
        crops = warp_to_template(images.float(), landmarks.float(), out_size=112, antialias=True)
        return self.face_encoder(crops).float()

    def condition(
        self, arcface_embeds: torch.Tensor, clip_embeds: torch.Tensor, text_states: torch.Tensor
    ) -> IdentityConditioning:
        return self.adapter(arcface_embeds, clip_embeds, text_states)

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: IdentityConditioning
    ) -> torch.Tensor:
        """The UNet's prediction (epsilon, v or x0, per the scheduler's prediction type)."""
        kwargs = {"id_tokens": cond.id_tokens} if cond.id_tokens is not None else None
        return self.unet(
            noisy, timesteps, encoder_hidden_states=cond.context, cross_attention_kwargs=kwargs
        ).sample

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type
