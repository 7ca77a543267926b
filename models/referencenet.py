"""Face ReferenceNet, FlashFace sec. 3.2: a copy of the main UNet that encodes the reference faces.

The ReferenceNet has the main UNet's architecture and starts from its weights (a deep copy). It
encodes M reference latents (224 px crops -> 4 x 28 x 28 at SD1.5 scale) and caches, at every
self-attention layer the placement asks for (mid + up blocks by default, FlashFace Table 4), that
layer's input y_r (M, h_r*w_r, C); the main UNet's :class:`ReferenceAttnProcessor`s attend to them.

Timestep and text (a choice the paper leaves open; configurable): the references are *clean*
latents seen at ``timestep = 0`` with the *empty prompt's* text states by default. FlashFace's released
code feeds the ReferenceNet the main step's timestep, which forces re-encoding at every denoising step;
a fixed timestep makes the features step-independent, so inference encodes the references once per
generation (the ReferenceNet of Animate Anyone makes the same choice). Pass the caption's states
instead of the empty prompt's to condition the references on text.

Plug points for the generator and the pipeline:

- ``ref = ReferenceNet.from_unet(unet, ReferenceNetConfig(...))`` copies the UNet (before or after
  :func:`~idforge.models.face_mask.widen_conv_in`: extra input channels are cut from the copy);
  ``ref.attach(unet)`` installs the reference processors on the main UNet (after any adapter
  processors).
- ``features = ref.encode_references(latents (B, N, 4, h, w), valid (B, N), text_states)`` ->
  :class:`ReferenceFeatures`; ``features.drop(mask)`` for training drops.
- ``unet(..., cross_attention_kwargs={"reference": features})``; guidance helpers in
  :mod:`idforge.models.guidance`.
- ``ref.save_pretrained(folder, unet)`` / ``ReferenceNet.from_pretrained(folder, unet)``.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .reference_attention import (
    PLACEMENTS,
    ReferenceAttnProcessor,
    ReferenceFeatures,
    ReferenceRecordAttnProcessor,
    ReferenceStore,
    install_reference_processors,
    load_reference_processors,
    reference_layers,
    save_reference_processors,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "referencenet_config.json"
UNET_FOLDER = "reference_unet"


@dataclass
class ReferenceNetConfig:
    """How references are encoded and injected."""

    placement: str = "decoder"
    """Where reference attention goes (FlashFace Table 4): decoder (mid + up, best), encoder (down + mid), both."""
    timestep: int = 0
    """The fixed timestep the ReferenceNet sees its clean reference latents at."""
    zero_init: bool = False
    """Zero the reference attention's output projection (untrained model = base UNet) instead of
    FlashFace's copy of the self-attention."""
    latent_channels: int = 4
    """Input channels of the ReferenceNet (the codec's latent channels; no face-mask channels)."""

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"ReferenceNetConfig.placement {self.placement!r} is not one of {sorted(PLACEMENTS)}"
            )
        if self.timestep < 0:
            raise ValueError(f"ReferenceNetConfig.timestep must be >= 0, got {self.timestep}")


def _narrow_conv_in(unet: nn.Module, channels: int) -> None:
    """Keep the first ``channels`` input channels of ``conv_in`` (the latent ones; widening appends)."""
    conv = unet.conv_in
    if conv.in_channels == channels:
        return
    if conv.in_channels < channels:
        raise ValueError(
            f"ReferenceNet: conv_in has {conv.in_channels} input channels, fewer than {channels}"
        )
    new = nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, :channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=channels)


class ReferenceNet(nn.Module):
    """The reference UNet (``self.unet``) with recorders at the placed self-attention layers."""

    def __init__(self, unet: nn.Module, config: ReferenceNetConfig | None = None):
        super().__init__()
        self.config = config or ReferenceNetConfig()
        _narrow_conv_in(unet, self.config.latent_channels)
        self.unet = unet
        self._store = ReferenceStore()
        self.layers = [name for name, _ in reference_layers(unet, self.config.placement)]
        procs = {name: AttnProcessor2_0() for name in unet.attn_processors}
        procs.update({name: ReferenceRecordAttnProcessor(name, self._store) for name in self.layers})
        unet.set_attn_processor(procs)

    @classmethod
    def from_unet(cls, unet: nn.Module, config: ReferenceNetConfig | None = None) -> ReferenceNet:
        """A ReferenceNet initialised from ``unet``'s weights (deep copy; its processors are reset)."""
        return cls(copy.deepcopy(unet), config)

    def attach(self, main_unet: nn.Module) -> nn.ModuleDict:
        """Install the reference processors on the main UNet at this ReferenceNet's placement."""
        return install_reference_processors(main_unet, self.config.placement, zero_init=self.config.zero_init)

    def forward(self, latents: torch.Tensor, text_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer states (M, h_r*w_r, C) of the reference latents (M, c, h, w).

        ``text_states``: (M, T, D), or (1, T, D) broadcast (the empty prompt by default).
        """
        m = latents.shape[0]
        if text_states.shape[0] not in (1, m):
            raise ValueError(f"ReferenceNet: text_states has batch {text_states.shape[0]}, expected 1 or {m}")
        text_states = text_states.expand(m, *text_states.shape[1:])  # (M, T, D)
        t = torch.full((m,), self.config.timestep, device=latents.device, dtype=torch.long)
        self._store.clear()
        self._store.open = True
        try:
            self.unet(latents, t, encoder_hidden_states=text_states)
        finally:
            self._store.open = False
        states = dict(self._store)
        self._store.clear()
        missing = [name for name in self.layers if name not in states]
        if missing:
            raise RuntimeError(
                f"ReferenceNet: layers {missing[:3]} recorded nothing; are their processors replaced?"
            )
        return states

    def encode_references(
        self,
        latents: torch.Tensor,
        text_states: torch.Tensor,
        valid: torch.Tensor | None = None,
        lambda_feat: float | torch.Tensor = 1.0,
    ) -> ReferenceFeatures:
        """Encode up to N references per sample, (B, N, c, h, w), only the ``valid`` (B, N) ones.

        ``text_states``: (1, T, D) for every reference (empty prompt), or (B, T, D) per sample (caption).
        Padding slots are neither encoded nor attended to.
        """
        b, n = latents.shape[:2]
        if valid is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=latents.device)
        if valid.shape != (b, n):
            raise ValueError(
                f"ReferenceNet.encode_references: valid must be ({b}, {n}), got {tuple(valid.shape)}"
            )
        if not bool(valid.any()):
            raise ValueError(
                "ReferenceNet.encode_references: no valid reference; pass reference=None instead"
            )
        packed = latents[valid]  # (M, c, h, w), row-major over (B, N)
        if text_states.shape[0] == b and b != 1:
            text_states = text_states[:, None].expand(b, n, *text_states.shape[1:])[valid]  # (M, T, D)
        return ReferenceFeatures.from_padded(self(packed, text_states), valid, lambda_feat)

    def parameter_groups(self, main_unet: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters to train, by role: the ReferenceNet and the main UNet's reference attention."""
        ref_attn = [
            p
            for proc in main_unet.attn_processors.values()
            if isinstance(proc, ReferenceAttnProcessor)
            for p in proc.parameters()
        ]
        return {"reference_net": list(self.unet.parameters()), "reference_attention": ref_attn}

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str | Path, main_unet: nn.Module | None = None) -> Path:
        """``<folder>/reference_unet/`` (diffusers), the config JSON and, given the main UNet, its
        reference processors' weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / UNET_FOLDER)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        if main_unet is not None:
            save_reference_processors(main_unet, folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, main_unet: nn.Module | None = None) -> ReferenceNet:
        """Load a folder written by :meth:`save_pretrained`; given the main UNet, install and load its
        reference processors too."""
        from diffusers import UNet2DConditionModel

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{folder}: no {CONFIG_NAME}; not a folder written by ReferenceNet.save_pretrained"
            )
        config = ReferenceNetConfig(**json.loads((folder / CONFIG_NAME).read_text()))
        net = cls(UNet2DConditionModel.from_pretrained(folder / UNET_FOLDER), config)
        if main_unet is not None:
            net.attach(main_unet)
            load_reference_processors(main_unet, folder)
        return net
