"""Reference attention, FlashFace sec. 3.2 eq. (1)-(2): the main UNet attends to ReferenceNet features.

At each placed self-attention layer (attn1) of the main UNet, with y_g the layer's input (the
normalised hidden states, B x h_g*w_g x C) and y_r1..y_rN the ReferenceNet's input at the same layer:

    out = Attn1(y_g, y_g) + (1 - lambda_feat) Attn_ref(y_g, y_g) + lambda_feat Attn_ref(y_g, cat[y_g, y_r1..y_rN])

added to the residual by diffusers' ``BasicTransformerBlock``. ``Attn_ref`` is an extra attention
layer (``to_q_ref``/``to_k_ref``/``to_v_ref``/``to_out_ref``) initialised as a copy of the layer's
self-attention, as in FlashFace's released code; the paper's design does not leave the base UNet
unchanged at init (the copy adds a second self-attention term), so ``zero_init=True`` offers the gated
option (zero ``to_out_ref``: an untrained model equals the base UNet, STYLE.md 5).

Identity mixing (FlashFace supplementary eq. (1)): references come in G groups (people) per sample
with weights w (rows sum to 1): ``sum_g w_g Attn_ref(y_g, cat[y_g, y_r^g...])``.

References travel explicitly as ``cross_attention_kwargs={"reference": ReferenceFeatures}``. A
:class:`ReferenceFeatures` maps each (sample, group, slot) to a row of the cached per-layer states
through ``index`` and masks padding and dropped references through ``mask``, so variable N, reference
drop, three-branch guidance and mixing all run as one batched SDPA call per layer, no loop per sample.
Placements (FlashFace Table 4): ``decoder`` (mid + up blocks, the paper's default), ``encoder``
(down + mid) and ``both``. Layers are found with :func:`~idforge.models.attention.iter_attention_layers`;
the placement only reads the top-level block of each layer's name (``down_blocks``/``mid_block``/``up_blocks``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from .attention import (
    PassThroughAttnProcessor,
    is_stock_processor,
    iter_attention_layers,
    load_processors,
    processor_key,
    processor_state_dict,
    save_processors,
)

log = logging.getLogger(__name__)

REFERENCE_PROCESSOR_WEIGHTS = "reference_processors.safetensors"
PLACEMENTS = {
    "decoder": ("mid_block", "up_blocks"),
    "encoder": ("down_blocks", "mid_block"),
    "both": ("down_blocks", "mid_block", "up_blocks"),
}


def reference_layers(unet: nn.Module, placement: str = "decoder") -> list[tuple[str, int]]:
    """(processor name, hidden size) of the self-attention layers that take references at ``placement``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"reference placement {placement!r} is not one of {sorted(PLACEMENTS)}")
    parts = PLACEMENTS[placement]
    layers = [
        (name, hidden)
        for name, hidden, cross in iter_attention_layers(unet)
        if cross is None and name.split(".", 1)[0] in parts
    ]
    if not layers:
        raise ValueError(
            f"reference placement {placement!r}: the UNet has no self-attention layer in {parts}"
        )
    return layers


@dataclass
class ReferenceFeatures:
    """Cached ReferenceNet states and how each sample of the main batch uses them.

    Attributes:
        states: layer processor name -> (M, h_r*w_r, C), one row per encoded reference image.
        index: (B, G, N) long, the states row of each sample's g-th group's n-th reference.
        mask: (B, G, N) bool, False for padding slots and dropped references (masked out of K/V).
        lambda_feat: eq. (2)'s weight, a float or a (B,) tensor; 1.0 skips the Attn_ref(y_g, y_g) branch.
        weights: (B, G) identity-mixing weights (rows sum to 1); None means G == 1.
    """

    states: dict[str, torch.Tensor]
    index: torch.Tensor
    mask: torch.Tensor
    lambda_feat: float | torch.Tensor = 1.0
    weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.index.ndim != 3 or self.mask.shape != self.index.shape:
            raise ValueError(
                f"ReferenceFeatures: index and mask must both be (B, G, N), got {tuple(self.index.shape)} "
                f"and {tuple(self.mask.shape)}"
            )
        groups = self.index.shape[1]
        if self.weights is None and groups != 1:
            raise ValueError(
                f"ReferenceFeatures: {groups} reference groups need mixing weights (B, {groups})"
            )
        if self.weights is not None and self.weights.shape != self.index.shape[:2]:
            raise ValueError(
                f"ReferenceFeatures: weights must be (B, G) = {tuple(self.index.shape[:2])}, "
                f"got {tuple(self.weights.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])

    @classmethod
    def from_padded(
        cls, states: dict[str, torch.Tensor], valid: torch.Tensor, lambda_feat: float | torch.Tensor = 1.0
    ) -> ReferenceFeatures:
        """Features for B samples with up to N references each, encoded as the packed rows
        ``latents[valid]`` (row-major over (B, N)); ``valid`` (B, N) bool marks the real references."""
        index = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
        index[valid] = torch.arange(int(valid.sum()), device=valid.device)
        return cls(states, index[:, None], valid[:, None].clone(), lambda_feat)

    def drop(self, which: torch.Tensor) -> ReferenceFeatures:
        """Drop every reference of the samples where ``which`` (B,) is True (then K/V = y_g only)."""
        return replace(self, mask=self.mask & ~which.to(self.mask.device).view(-1, 1, 1))

    def repeat(self, times: int) -> ReferenceFeatures:
        """The same references for ``times`` stacked copies of the batch (rows of states are shared)."""
        lam = self.lambda_feat
        return replace(
            self,
            index=self.index.repeat(times, 1, 1),
            mask=self.mask.repeat(times, 1, 1),
            lambda_feat=lam.repeat(times) if isinstance(lam, torch.Tensor) else lam,
            weights=None if self.weights is None else self.weights.repeat(times, 1),
        )

    def with_lambda(self, lambda_feat: float | torch.Tensor) -> ReferenceFeatures:
        return replace(self, lambda_feat=lambda_feat)

    @staticmethod
    def mix(a: ReferenceFeatures, b: ReferenceFeatures, weight: float | torch.Tensor) -> ReferenceFeatures:
        """Identity mixing: ``weight`` of person ``a`` and ``1 - weight`` of person ``b`` (FlashFace supp. eq. (1)).

        Both must cover the same batch; their states are stacked and ``b``'s rows re-indexed.
        """
        if a.batch_size != b.batch_size or a.states.keys() != b.states.keys():
            raise ValueError("ReferenceFeatures.mix: both features must cover the same batch and layers")
        n = max(a.index.shape[2], b.index.shape[2])

        def pad(x: torch.Tensor, value) -> torch.Tensor:  # (B, G, n') -> (B, G, n)
            return F.pad(x, (0, n - x.shape[2]), value=value)

        offset = next(iter(a.states.values())).shape[0]
        w = torch.as_tensor(weight, dtype=torch.float32, device=a.index.device).reshape(-1, 1)
        w = w.expand(a.batch_size, 1)
        wa = a.weights * w if a.weights is not None else w
        wb = b.weights * (1 - w) if b.weights is not None else 1 - w
        return ReferenceFeatures(
            states={k: torch.cat([a.states[k], b.states[k]]) for k in a.states},
            index=torch.cat([pad(a.index, 0), pad(b.index + offset, 0)], dim=1),
            mask=torch.cat([pad(a.mask, False), pad(b.mask, False)], dim=1),
            lambda_feat=a.lambda_feat,
            weights=torch.cat([wa, wb], dim=1),
        )


class ReferenceStore(dict):
    """Layer name -> recorded state; records only while ``open`` (not during checkpoint recomputation)."""

    open: bool = False


class ReferenceRecordAttnProcessor(AttnProcessor2_0):
    """ReferenceNet side: stock self-attention that stores its input y_r (M, h_r*w_r, C) in ``store``
    under its layer name (FlashFace caches the self-attention block's normalised input)."""

    def __init__(self, layer: str, store: ReferenceStore):
        super().__init__()
        self.layer, self.store = layer, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if self.store.open:
            self.store[self.layer] = hidden_states  # (M, h_r*w_r, C)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceAttnProcessor(nn.Module):
    """Self-attention plus FlashFace's reference attention (eq. (1)-(2)) over cached reference states."""

    def __init__(self, layer: str, hidden_size: int, bias_qkv: bool = False, bias_out: bool = True):
        super().__init__()
        self.layer, self.hidden_size = layer, hidden_size
        self.to_q_ref = nn.Linear(hidden_size, hidden_size, bias=bias_qkv)
        self.to_k_ref = nn.Linear(hidden_size, hidden_size, bias=bias_qkv)
        self.to_v_ref = nn.Linear(hidden_size, hidden_size, bias=bias_qkv)
        self.to_out_ref = nn.Linear(hidden_size, hidden_size, bias=bias_out)
        self.last_key_length: int | None = None
        """K/V length of the last reference attention (h_g*w_g + N*h_r*w_r), kept for inspection."""
        self._stock = AttnProcessor2_0()

    @classmethod
    def from_attention(cls, layer: str, attn: Attention, zero_init: bool = False) -> ReferenceAttnProcessor:
        """A processor whose reference attention is a copy of ``attn``'s projections (FlashFace);
        ``zero_init`` zeroes ``to_out_ref`` instead, so the untrained layer adds nothing."""
        hidden = int(attn.to_q.out_features)
        proc = cls(
            layer, hidden, bias_qkv=attn.to_q.bias is not None, bias_out=attn.to_out[0].bias is not None
        )
        ref = attn.to_q.weight
        proc.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for mine, theirs in (
                (proc.to_q_ref, attn.to_q),
                (proc.to_k_ref, attn.to_k),
                (proc.to_v_ref, attn.to_v),
                (proc.to_out_ref, attn.to_out[0]),
            ):
                mine.load_state_dict(theirs.state_dict())
            if zero_init:
                nn.init.zeros_(proc.to_out_ref.weight)
                if proc.to_out_ref.bias is not None:
                    nn.init.zeros_(proc.to_out_ref.bias)
        return proc

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        reference: ReferenceFeatures | None = None,
        id_tokens: torch.Tensor | None = None,
        id_scale: float = 1.0,
    ) -> torch.Tensor:
        if hidden_states.ndim != 3:
            raise ValueError(
                f"ReferenceAttnProcessor({self.layer}): expects (B, L, C) token states, got "
                f"{tuple(hidden_states.shape)}; install it on a transformer block's attn1 only"
            )
        out = self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        extra = self.reference_term(attn.heads, hidden_states, reference)
        return out + extra / attn.rescale_output_factor

    def reference_term(
        self, heads: int, y: torch.Tensor, reference: ReferenceFeatures | None
    ) -> torch.Tensor:
        """(1 - lambda) Attn_ref(y, y) + lambda sum_g w_g Attn_ref(y, cat[y, y_r^g]), projected by to_out_ref."""
        b, length, c = y.shape
        d = c // heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], -1, heads, d).transpose(1, 2)  # (B, h, L, d)

        query = split(self.to_q_ref(y))
        key_self, value_self = self.to_k_ref(y), self.to_v_ref(y)  # (B, L, C)
        if reference is None:
            out = F.scaled_dot_product_attention(query, split(key_self), split(value_self))
        else:
            out = self._attend_references(query, key_self, value_self, reference, heads)
        out = out.transpose(1, 2).reshape(b, length, c).to(y.dtype)  # (B, L, C)
        return self.to_out_ref(out)

    def _attend_references(self, query, key_self, value_self, reference: ReferenceFeatures, heads):
        b, length, c = key_self.shape
        d = c // heads
        if reference.batch_size != b:
            raise ValueError(
                f"ReferenceAttnProcessor({self.layer}): reference features cover {reference.batch_size} "
                f"samples but the UNet batch has {b}; use ReferenceFeatures.repeat for guidance batches"
            )
        states = reference.states.get(self.layer)
        if states is None:
            raise KeyError(
                f"ReferenceAttnProcessor: no cached reference state for {self.layer}; was the ReferenceNet "
                "built with the same placement as the main UNet's processors?"
            )
        _, groups, n = reference.index.shape
        rows = reference.index.reshape(-1)  # (B*G*N,)
        states = states.to(key_self.dtype)
        key_ref = self.to_k_ref(states)[rows]  # (B*G*N, Lr, C): project the M cached rows once, then gather
        value_ref = self.to_v_ref(states)[rows]
        lr = key_ref.shape[1]
        key_ref = key_ref.reshape(b * groups, n * lr, c)  # (B*G, N*Lr, C)
        value_ref = value_ref.reshape(b * groups, n * lr, c)
        key = torch.cat([key_self.repeat_interleave(groups, 0), key_ref], dim=1)  # (B*G, L + N*Lr, C)
        value = torch.cat([value_self.repeat_interleave(groups, 0), value_ref], dim=1)
        self.last_key_length = int(key.shape[1])
        attn_mask = None
        if not bool(reference.mask.all()):
            keep_ref = reference.mask.reshape(b * groups, n, 1).expand(-1, -1, lr).reshape(b * groups, n * lr)
            keep_self = keep_ref.new_ones(b * groups, length)
            attn_mask = torch.cat([keep_self, keep_ref], dim=1)[:, None, None, :]  # (B*G, 1, 1, L + N*Lr)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], -1, heads, d).transpose(1, 2)  # (B*G, h, L, d)

        out = F.scaled_dot_product_attention(
            query.repeat_interleave(groups, 0), split(key), split(value), attn_mask=attn_mask
        )  # (B*G, h, L, d)
        if groups > 1:
            w = reference.weights.to(out.dtype).reshape(b, groups, 1, 1, 1)
            out = (out.reshape(b, groups, heads, length, d) * w).sum(1)  # (B, h, L, d)
        lam = reference.lambda_feat
        if isinstance(lam, torch.Tensor) or lam != 1.0:
            out_self = F.scaled_dot_product_attention(query, split(key_self), split(value_self))
            lam = torch.as_tensor(lam, dtype=out.dtype, device=out.device).reshape(-1, 1, 1, 1)
            out = lam * out + (1 - lam) * out_self
        return out


def install_reference_processors(
    unet: nn.Module, placement: str = "decoder", zero_init: bool = False
) -> nn.ModuleDict:
    """Set :class:`ReferenceAttnProcessor` on the placed self-attention layers of the main UNet.

    Other layers keep their processor, except stock ones (and the adapter's self-attention
    pass-through), which become :class:`~idforge.models.attention.PassThroughAttnProcessor` so that the ``reference``
    keyword reaches every layer silently. Install identity processors (adapter) first: their
    installer resets every self-attention layer. Returns the new processors keyed by layer name with
    '.' -> '__' (they also live in ``unet.state_dict()`` as ``<layer>.processor.to_*_ref.*``).
    """
    modules = dict(unet.named_modules())
    procs = dict(unet.attn_processors)
    placed = dict(reference_layers(unet, placement))
    trainable = nn.ModuleDict()
    for name, current in procs.items():
        if name in placed:
            attn = modules[name.removesuffix(".processor")]
            procs[name] = ReferenceAttnProcessor.from_attention(name, attn, zero_init=zero_init)
            trainable[processor_key(name)] = procs[name]
        elif is_stock_processor(current):
            procs[name] = PassThroughAttnProcessor()
    unet.set_attn_processor(procs)
    log.info("installed %d reference attention processors (placement %s)", len(trainable), placement)
    return trainable


def reference_processor_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The reference processors' tensors, keyed as in ``unet.state_dict()`` (``<layer>.processor.<param>``)."""
    return processor_state_dict(unet, ReferenceAttnProcessor)


def save_reference_processors(unet: nn.Module, folder: str | Path) -> Path:
    """Write the reference processors' weights alone to ``<folder>/reference_processors.safetensors``."""
    return save_processors(
        unet, ReferenceAttnProcessor, folder, REFERENCE_PROCESSOR_WEIGHTS, "install_reference_processors"
    )


def load_reference_processors(unet: nn.Module, path: str | Path) -> None:
    """Load weights written by :func:`save_reference_processors` (folder or file); keys must match exactly."""
    load_processors(
        unet, ReferenceAttnProcessor, path, REFERENCE_PROCESSOR_WEIGHTS, "install_reference_processors"
    )
