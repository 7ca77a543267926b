"""The identity-conditioned generator: SD1.5 UNet + codec + CLIP text encoder + identity encoders + adapter.

Composition, not a fork (ARCHITECTURE.md): diffusers' ``UNet2DConditionModel`` is used as is; the
Diff-ID adapter (:mod:`idforge.models.adapter`) turns (ArcFace, CLIP image, CLIP text) embeddings
into the context the UNet's cross-attention attends to (Diff-ID sec. 3.2), or, for the
``decoupled`` variant, identity tokens that reach the UNet through ``IdentityAttnProcessor``s
passed explicitly via ``cross_attention_kwargs``.

Conditioning (``GeneratorConfig.conditioning``, SPEC.md sec. 3): ``adapter`` (Diff-ID identity
tokens), ``referencenet`` (FlashFace reference feature maps, :mod:`idforge.models.referencenet`; the
UNet keeps the plain text states) or ``both``. Construction order for the ReferenceNet: the adapter's
identity processors first, then ``ReferenceNet.from_unet`` (a copy of the main UNet's weights), then
``widen_conv_in`` for the face mask, then ``ref.attach(unet)`` (reference attention processors).

Frozen (Diff-ID appendix A.1): VAE, CLIP text and image encoders, ArcFace. Trainable: the adapter,
the ReferenceNet and the reference attention (FlashFace trains both UNets) and, when ``train_unet``
is set (Diff-ID fine-tunes the UNet), the UNet. One predicate,
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
from .face_mask import box_mask, face_mask_input, widen_conv_in
from .reference_attention import ReferenceFeatures
from .referencenet import ReferenceNet, ReferenceNetConfig

log = logging.getLogger(__name__)

CONDITIONINGS = ("adapter", "referencenet", "both")
FACE_MASKS = ("none", "mask", "inpaint")


@dataclass
class ReferenceOptions:
    """The ``generator.reference`` section: :class:`ReferenceNetConfig` options plus the input side."""

    net: ReferenceNetConfig
    face_mask: str = "none"
    """``none``; ``mask`` (a box channel beside the noisy latent); ``inpaint`` (+ the target latent
    with the face box zeroed), FlashFace sec. 3.2."""
    image_size: int = 224
    """Pixels the reference photos are resized to before the VAE (224 -> 28 x 28 latents at SD1.5)."""

    @classmethod
    def from_dict(cls, options: dict | None, key: str = "generator.reference") -> ReferenceOptions:
        options = dict(options or {})
        face_mask = options.pop("face_mask", "none")
        image_size = int(options.pop("image_size", 224))
        if face_mask not in FACE_MASKS:
            raise ValueError(f"{key}.face_mask: {face_mask!r} is not one of {FACE_MASKS}")
        if image_size <= 0:
            raise ValueError(f"{key}.image_size: must be positive, got {image_size}")
        known = set(ReferenceNetConfig.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"{key}: unknown options {unknown}; use {sorted(known | {'face_mask', 'image_size'})}"
            )
        try:
            net = ReferenceNetConfig(**options)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        return cls(net, face_mask, image_size)


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
    conditioning: str = "adapter"
    """``adapter`` (Diff-ID identity tokens), ``referencenet`` (FlashFace reference features) or ``both``."""
    reference: dict | None = None
    """ReferenceNet options (:class:`ReferenceNetConfig` fields: placement, timestep, zero_init) plus
    ``face_mask`` (none | mask | inpaint) and ``image_size`` (reference pixels, 224); used when
    ``conditioning`` is ``referencenet`` or ``both``."""

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
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"generator.conditioning: {self.conditioning!r} is not one of {CONDITIONINGS}")
        if self.conditioning == "adapter" and self.reference is not None:
            raise ValueError(
                "generator.reference: set only with conditioning referencenet or both (got adapter)"
            )
        if self.uses_reference:
            ReferenceOptions.from_dict(self.reference)
        if self.conditioning == "referencenet":
            return  # no adapter to check
        if self.adapter_path is not None:
            if not (Path(self.adapter_path).expanduser() / "config.json").is_file():
                raise FileNotFoundError(
                    f"generator.adapter_path: {self.adapter_path} is not an adapter folder (no "
                    "config.json); point it at a folder written by DiffIDAdapter.save_pretrained"
                )
        else:
            check_adapter_options(dict(self.adapter), key="generator.adapter")

    @property
    def uses_reference(self) -> bool:
        return self.conditioning in ("referencenet", "both")


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
        reference_net: ReferenceNet | None = None,
        face_mask: str = "none",
        reference_size: int = 224,
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
        self.reference_net = reference_net
        self.face_mask, self.reference_size = face_mask, reference_size
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
        adapter = None
        if cfg.conditioning == "referencenet":
            pass  # the UNet attends to the text states and the reference features only
        elif cfg.adapter_path:
            adapter = DiffIDAdapter.from_pretrained(cfg.adapter_path)
        else:
            kwargs = dict(cfg.adapter)
            kwargs.setdefault("arcface_dim", int(face_encoder.embedding_size))
            kwargs.setdefault("clip_dim", int(image_encoder.output_dim))
            kwargs.setdefault("text_dim", int(text_encoder.config.hidden_size))
            kwargs.setdefault("cross_attention_dim", int(unet.config.cross_attention_dim))
            kwargs.setdefault("clip_tokens", "patch" if spec.image_tokens == "patch" else "pooled")
            adapter = DiffIDAdapter(**kwargs)
        if adapter is not None and adapter.config.variant == "decoupled":
            from .attention import install_identity_processors

            install_identity_processors(unet, cross_attention_dim=int(unet.config.cross_attention_dim))
        reference_net, ref_opts = None, None
        if cfg.uses_reference:  # order: identity processors, copy, widen conv_in, reference processors
            ref_opts = ReferenceOptions.from_dict(cfg.reference)
            ref_opts.net.latent_channels = int(unet.config.in_channels)
            reference_net = ReferenceNet.from_unet(unet, ref_opts.net)
            if ref_opts.face_mask != "none":
                widen_conv_in(unet, 1 if ref_opts.face_mask == "mask" else 1 + ref_opts.net.latent_channels)
            reference_net.attach(unet)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if reference_net is not None:
                reference_net.unet.enable_gradient_checkpointing()
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
            reference_net=reference_net,
            face_mask=ref_opts.face_mask if ref_opts else "none",
            reference_size=ref_opts.image_size if ref_opts else 224,
        )
        model.zoo_spec = spec
        return model

    # ------------------------------------------------------------------ trainable parts
    def is_trainable(self, name: str) -> bool:
        """The one predicate for "trains and is saved": adapter, identity attention processors,
        the ReferenceNet, and the UNet when ``train_unet``."""
        if name.startswith(("adapter.", "reference_net.")):
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
        if self.adapter is None:  # referencenet only: the UNet sees the text states as in SD1.5
            return IdentityConditioning(context=text_states)
        return self.adapter(arcface_embeds, clip_embeds, text_states)

    def encode_references(
        self,
        images: torch.Tensor,
        valid: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        lambda_feat: float | torch.Tensor = 1.0,
    ) -> ReferenceFeatures:
        """ReferenceNet features of reference photos (B, N, 3, H, W) in [-1, 1], ``valid`` (B, N).

        Each photo is resized to ``reference_size`` and VAE-encoded (frozen); the ReferenceNet sees
        the empty prompt's states unless ``text_states`` are given (see :mod:`.referencenet`).
        """
        if self.reference_net is None:
            raise ValueError("encode_references: this generator has no ReferenceNet (conditioning: adapter)")
        b, n = images.shape[:2]
        flat = images.flatten(0, 1)  # (B*N, 3, H, W)
        if valid is not None:
            flat = flat[valid.reshape(-1).to(flat.device)]  # only the real references are encoded
        size = self.reference_size
        if flat.shape[-2:] != (size, size):
            flat = nn.functional.interpolate(flat.float(), size=(size, size), mode="bilinear", antialias=True)
        with torch.no_grad():
            lat = self.codec.encode(flat.to(self.device), generator=generator)  # (M, c, h, w)
        if valid is not None:
            full = lat.new_zeros(b * n, *lat.shape[1:])
            full[valid.reshape(-1).to(lat.device)] = lat
            lat = full
        lat = lat.view(b, n, *lat.shape[1:])  # (B, N, c, h, w)
        if text_states is None:
            text_states = self.encode_text([""])  # (1, T, D)
        return self.reference_net.encode_references(lat, text_states, valid, lambda_feat)

    def unet_input(
        self,
        noisy: torch.Tensor,
        boxes: torch.Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        latent: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The noisy latent with the face-mask channels the UNet was widened for (none: unchanged).

        ``boxes`` (B, 4) face boxes in pixels of ``image_size`` (H, W); without boxes the mask is
        empty (the "w/o pmask" input); ``latent`` the clean target (inpaint variant); ``drop`` (B,)
        zeroes the extra channels per sample.
        """
        if self.face_mask == "none":
            return noisy
        b, _, h, w = noisy.shape
        if boxes is None:
            mask = noisy.new_zeros(b, 1, h, w)
        else:
            mask = box_mask(boxes.to(noisy.device), image_size, (h, w)).to(noisy.dtype)
        if self.face_mask == "inpaint":
            latent = latent if latent is not None else noisy.new_zeros(noisy.shape)
            return face_mask_input(noisy, mask, latent, drop)
        return face_mask_input(noisy, mask, None, drop)

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: IdentityConditioning,
        reference: ReferenceFeatures | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction (epsilon, v or x0, per the scheduler's prediction type).

        ``noisy`` carries the face-mask channels already (:meth:`unet_input`); ``reference`` the
        ReferenceNet features (None: the reference attention sees y_g only).
        """
        kwargs = {}
        if cond.id_tokens is not None:
            kwargs["id_tokens"] = cond.id_tokens
        if reference is not None:
            kwargs["reference"] = reference
        return self.unet(
            noisy, timesteps, encoder_hidden_states=cond.context, cross_attention_kwargs=kwargs or None
        ).sample

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type
