"""Diff-ID identity adapter: projections, pooling, shared W_s, dual cross-attention, fusion MLP.

Diff-ID (paper 004), sec. 3.2 and appendix A.1 (equation numbers of the appendix):

    e'_arc = W_arc e_arc,  e'_i = W_i e_i                                         (5)
    e_img = Concat(e'_arc, e'_i),  e_max = MaxPool(e_img),  e_avg = AvgPool(e_img)   (pooled over tokens)
    e_id  = Concat(e'_arc, e'_i, e_max, e_avg)                                    (6)
    ~e_id = W_s e_id,  ~e_t = W_s e_t                                             (7)  ONE shared W_s
    e = (Q K^T / sqrt(d)) V                                                       (8)  no softmax
    Q_id = W_q^id ~e_id,  K_id = W_k^id ~e_t,  V_id = W_v^id ~e_t  -> e_identity     (9)-(10)
    Q_at = W_q^at ~e_t,   K_at = W_k^at ~e_id, V_at = W_v^at ~e_id -> e_attribute    (11)-(12)
    e_fused = Concat(e_identity, e_attribute)  (token axis)                       (13)
    e_refined = MLP(e_fused),  MLP(x) = ReLU(W2 ReLU(W1 x + b1) + b2)              (14)-(15)

``e_refined`` replaces the text states as the UNet's cross-attention context (paper Fig. 2).
Choices where the paper is silent: W_arc, W_i, W_s and the Q/K/V projections are bias-free
("projection matrices"); W_arc and W_i map into the text width, since the one W_s is applied to
both e_id and e_t; W_s maps to ``model_dim`` (default: the text width), which is d of eq. (8)
(per head with ``num_heads`` > 1); the MLP's hidden width defaults to 2 x ``model_dim``; its output
width is the UNet's ``cross_attention_dim``.

Tokens built per variant (``clip_tokens="pooled"``: e_i is one token; ``"patch"``: N tokens):

- ``final`` (the paper): e_img = [e'_arc ; e'_i], e_id = [e'_arc ; e'_i ; e_max ; e_avg]
  (4 tokens pooled, N + 3 patch); dual cross-attention; context = MLP([e_identity ; e_attribute]),
  L_ctx = L_id + L_text.
- ``arcface`` (Table 2, ArcFace-only): e_img = [e'_arc], e_id = [e'_arc ; e_max ; e_avg] (3 tokens;
  pooling one token returns it); otherwise as ``final``.
- ``clip`` (Table 2, CLIP-only): e_img = [e'_i], e_id = [e'_i ; e_max ; e_avg] (3 pooled, N + 2 patch).
- ``joint`` (Table 2, concatenation): e_id as ``final``; no dual attention:
  context = MLP([~e_id ; ~e_t]).
- ``decoupled`` (IP-Adapter baseline, Ye et al. 2023 sec. 3.2): the text states reach the UNet
  unchanged (``context = text_states``); ``id_tokens`` = LayerNorm(reshape(W [e_arc ; e_i]))
  gives ``num_decoupled_tokens`` tokens of the cross-attention width (IP-Adapter's image
  projection; patch CLIP tokens are averaged first), consumed by
  :class:`idforge.models.attention.IdentityAttnProcessor` through their own K/V.

Diff-ID has no text residual: every path to the context passes through the identity tokens, so
with zeroed identity inputs the ``final`` context is a constant (MLP(0)) whatever the prompt.
``text_residual=True`` (not in the paper; a stabiliser for identity dropout and classifier-free
guidance) adds ~e_t to e_attribute so the prompt survives.

``text_start=True`` (not in the paper; STYLE convention 5): the paper's context replacement starts
from a near-constant, near-zero context (at SD1.5 widths the untrained ``final`` context has mean
~0.007 and token-to-token std ~0.002, against CLIP text states of norm ~28), so the pretrained
UNet starts out unconditional. With ``text_start`` the context is
``[0 ; e_t] + MLP(e_fused)`` with the MLP's output layer zero-initialised: at step 0 the attribute
tokens equal the CLIP text states exactly and the identity tokens are zero, so the UNet starts
from its pretrained text-conditioned behaviour (the zero identity tokens still take a share
exp(0) / sum(exp) of each softmax row, which the text tokens' large logits make small), and the
output layer receives gradients from the first step. It needs ``final_activation=False``
(a ReLU at a zero output passes no gradient) and ``text_dim == cross_attention_dim``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

log = logging.getLogger(__name__)

VARIANTS = ("final", "joint", "arcface", "clip", "decoupled")
CLIP_TOKENS = ("pooled", "patch")


@dataclass
class IdentityConditioning:
    """What the UNet receives: the cross-attention context and, for ``decoupled``, identity tokens."""

    context: torch.Tensor
    """(B, L_ctx, cross_attention_dim): what the UNet's cross-attention attends to."""
    id_tokens: torch.Tensor | None = None
    """(B, n, cross_attention_dim), ``decoupled`` only; the UNet takes them as
    ``cross_attention_kwargs={"id_tokens": ...}``."""


def product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int = 1,
    softmax: bool = False,
    normalize_by_length: bool = False,
) -> torch.Tensor:
    """e = (Q K^T / sqrt(d)) V per head, Diff-ID eq. (8); d is the per-head width.

    ``softmax`` applies softmax over the keys (standard attention; the paper omits it);
    ``normalize_by_length`` divides the no-softmax scores by the key count (a stabiliser).
    """
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // num_heads
    q = q.reshape(b, lq, num_heads, d).transpose(1, 2)  # (B, h, Lq, d)
    k = k.reshape(b, lk, num_heads, d).transpose(1, 2)  # (B, h, Lk, d)
    v = v.reshape(b, lk, num_heads, d).transpose(1, 2)  # (B, h, Lk, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, Lq, Lk)
    if softmax:
        scores = scores.softmax(dim=-1)
    elif normalize_by_length:
        scores = scores / lk
    return (scores @ v).transpose(1, 2).reshape(b, lq, c)  # (B, Lq, C)


class DualCrossAttention(nn.Module):
    """Diff-ID eq. (9)-(12): identity queries attend to text, text queries attend to identity.

    Bias-free Q/K/V projections per branch; no softmax by default.
    """

    def __init__(
        self, dim: int, num_heads: int = 1, softmax: bool = False, normalize_by_length: bool = False
    ):
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"DualCrossAttention: dim {dim} must be a positive multiple of num_heads {num_heads}"
            )
        if softmax and normalize_by_length:
            raise ValueError(
                "DualCrossAttention: choose softmax or normalize_by_length, not both "
                "(softmax already normalises over the keys)"
            )
        self.num_heads, self.softmax, self.normalize_by_length = num_heads, softmax, normalize_by_length
        self.to_q_id = nn.Linear(dim, dim, bias=False)
        self.to_k_id = nn.Linear(dim, dim, bias=False)
        self.to_v_id = nn.Linear(dim, dim, bias=False)
        self.to_q_attr = nn.Linear(dim, dim, bias=False)
        self.to_k_attr = nn.Linear(dim, dim, bias=False)
        self.to_v_attr = nn.Linear(dim, dim, bias=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return product_attention(q, k, v, self.num_heads, self.softmax, self.normalize_by_length)

    def forward(
        self, id_tokens: torch.Tensor, text_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(~e_id (B, L_id, D), ~e_t (B, L_t, D)) -> (e_identity (B, L_id, D), e_attribute (B, L_t, D))."""
        e_identity = self._attend(
            self.to_q_id(id_tokens), self.to_k_id(text_tokens), self.to_v_id(text_tokens)
        )
        e_attribute = self._attend(
            self.to_q_attr(text_tokens), self.to_k_attr(id_tokens), self.to_v_attr(id_tokens)
        )
        return e_identity, e_attribute


class FusionMLP(nn.Module):
    """Diff-ID eq. (15): MLP(x) = ReLU(W2 ReLU(W1 x + b1) + b2); the final ReLU is switchable."""

    def __init__(self, dim: int, hidden: int, out: int, final_activation: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.final_activation = final_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(torch.relu(self.fc1(x)))
        return torch.relu(x) if self.final_activation else x


def check_adapter_options(options: dict, key: str = "adapter") -> None:
    """Validate adapter keyword arguments without building anything (so a configuration fails before
    any model loads); errors name ``<key>.<option>``. Widths are checked when the adapter is built."""
    import inspect

    known = set(inspect.signature(DiffIDAdapter.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{key}.{unknown[0]}: not an adapter option; known: {sorted(known)}")
    variant = options.get("variant", "final")
    if variant not in VARIANTS:
        raise ValueError(f"{key}.variant: must be one of {VARIANTS}, got {variant!r}")
    if options.get("clip_tokens", "pooled") not in CLIP_TOKENS:
        raise ValueError(f"{key}.clip_tokens: must be one of {CLIP_TOKENS}, got {options['clip_tokens']!r}")
    if options.get("softmax") and options.get("normalize_by_length"):
        raise ValueError(
            f"{key}.normalize_by_length: incompatible with {key}.softmax (softmax already normalises "
            "over the keys); set one of them to false"
        )
    if options.get("text_start") and options.get("final_activation", True) and variant != "decoupled":
        raise ValueError(
            f"{key}.text_start: needs {key}.final_activation: false (a final ReLU at the "
            "zero-initialised output passes no gradient)"
        )


class DiffIDAdapter(ModelMixin, ConfigMixin):
    """The identity adapter: ``forward(e_arc, e_i, e_t) -> IdentityConditioning`` (see module docstring)."""

    @register_to_config
    def __init__(
        self,
        variant: str = "final",
        arcface_dim: int = 512,
        clip_dim: int = 1024,
        text_dim: int = 768,
        cross_attention_dim: int = 768,
        model_dim: int | None = None,
        mlp_hidden_dim: int | None = None,
        num_heads: int = 1,
        softmax: bool = False,
        normalize_by_length: bool = False,
        input_layernorm: bool = False,
        final_activation: bool = True,
        clip_tokens: str = "pooled",
        num_decoupled_tokens: int = 4,
        text_residual: bool = False,
        text_start: bool = False,
    ):
        """
        Args:
            variant: ``final`` (paper), ``joint``, ``arcface``, ``clip`` (Diff-ID Table 2) or ``decoupled``.
            arcface_dim / clip_dim / text_dim: widths of e_arc, e_i and e_t.
            cross_attention_dim: the UNet's context width (768 for SD1.5).
            model_dim: output width of W_s, i.e. the dual attention's width (default: ``text_dim``).
            mlp_hidden_dim: fusion-MLP hidden width (default: 2 x ``model_dim``).
            num_heads: heads of the dual cross-attention (paper: 1).
            softmax: softmax over keys in the dual attention (paper: no).
            normalize_by_length: divide the no-softmax scores by the key count (not in the paper).
            input_layernorm: LayerNorm on e_id and e_t before W_s (not in the paper).
            final_activation: the MLP's final ReLU (paper: yes; the context is then non-negative).
            clip_tokens: ``pooled`` (e_i is (B, Dc), one token) or ``patch`` (e_i is (B, N, Dc)).
            num_decoupled_tokens: identity tokens of the ``decoupled`` variant (IP-Adapter: 4).
            text_residual: add ~e_t to e_attribute (not in the paper; keeps the prompt when the
                identity input is zero).
            text_start: context = [0 ; e_t] + MLP(e_fused) with a zero-initialised MLP output
                layer, so training starts from the pretrained text conditioning (not in the paper).
        """
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"DiffIDAdapter: variant must be one of {VARIANTS}, got {variant!r}")
        if clip_tokens not in CLIP_TOKENS:
            raise ValueError(f"DiffIDAdapter: clip_tokens must be one of {CLIP_TOKENS}, got {clip_tokens!r}")
        for name, value in (
            ("arcface_dim", arcface_dim),
            ("clip_dim", clip_dim),
            ("text_dim", text_dim),
            ("cross_attention_dim", cross_attention_dim),
            ("num_heads", num_heads),
            ("num_decoupled_tokens", num_decoupled_tokens),
        ):
            if value < 1:
                raise ValueError(f"DiffIDAdapter: {name} must be >= 1, got {value}")
        dim = model_dim or text_dim
        hidden = mlp_hidden_dim or 2 * dim
        if dim % num_heads:
            raise ValueError(f"DiffIDAdapter: model_dim {dim} is not divisible by num_heads {num_heads}")
        self.use_arcface = variant != "clip"
        self.use_clip = variant != "arcface"
        if variant == "decoupled":
            # IP-Adapter image projection: one vector -> n tokens of the UNet's context width.
            self.norm_input = nn.LayerNorm(arcface_dim + clip_dim) if input_layernorm else None
            self.proj_decoupled = nn.Linear(
                arcface_dim + clip_dim, num_decoupled_tokens * cross_attention_dim
            )
            self.norm_decoupled = nn.LayerNorm(cross_attention_dim)
            return
        # W_arc and W_i map into the text width: the one W_s is applied to both e_id and e_t (eq. 7).
        w_arc = nn.Linear(arcface_dim, text_dim, bias=False)  # W_arc
        w_i = nn.Linear(clip_dim, text_dim, bias=False)  # W_i
        self.proj_arcface = w_arc if self.use_arcface else None
        self.proj_clip = w_i if self.use_clip else None
        self.norm_id = nn.LayerNorm(text_dim) if input_layernorm else None
        self.norm_text = nn.LayerNorm(text_dim) if input_layernorm else None
        self.shared_proj = nn.Linear(text_dim, dim, bias=False)  # W_s
        self.dual_attention = (
            DualCrossAttention(dim, num_heads, softmax, normalize_by_length) if variant != "joint" else None
        )
        self.mlp = FusionMLP(dim, hidden, cross_attention_dim, final_activation)
        if text_start:
            check_adapter_options({"text_start": text_start, "final_activation": final_activation})
            if text_dim != cross_attention_dim:
                raise ValueError(
                    f"adapter.text_start: the text width {text_dim} must equal the UNet's "
                    f"cross_attention_dim {cross_attention_dim} to start from the text states"
                )
            nn.init.zeros_(self.mlp.fc2.weight)
            nn.init.zeros_(self.mlp.fc2.bias)

    # ------------------------------------------------------------------ inputs
    def _clip_tokens(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        """e_i as tokens: (B, 1, Dc) for pooled, (B, N, Dc) for patch embeddings."""
        mode = self.config.clip_tokens
        if mode == "pooled" and clip_embeds.dim() != 2:
            raise ValueError(
                f"DiffIDAdapter(clip_tokens='pooled') expects CLIP image embeddings (B, D), got "
                f"{tuple(clip_embeds.shape)}; set clip_tokens='patch' for patch tokens"
            )
        if mode == "patch" and clip_embeds.dim() != 3:
            raise ValueError(
                f"DiffIDAdapter(clip_tokens='patch') expects CLIP patch tokens (B, N, D), got "
                f"{tuple(clip_embeds.shape)}; set clip_tokens='pooled' for pooled embeddings"
            )
        if clip_embeds.shape[-1] != self.config.clip_dim:
            raise ValueError(
                f"DiffIDAdapter: CLIP embeddings have width {clip_embeds.shape[-1]}, the adapter was "
                f"built with clip_dim={self.config.clip_dim}"
            )
        return clip_embeds.unsqueeze(1) if clip_embeds.dim() == 2 else clip_embeds

    def identity_tokens(self, arcface_embeds: torch.Tensor, clip_embeds: torch.Tensor) -> torch.Tensor:
        """e_id of eq. (6), before W_s: (B, L_id, text_dim); the tokens per variant are listed above."""
        if self.config.variant == "decoupled":
            raise ValueError("DiffIDAdapter: the decoupled variant builds no e_id tokens; use forward()")
        parts = []
        if self.use_arcface:
            parts.append(self.proj_arcface(arcface_embeds).unsqueeze(1))  # (B, 1, Dt)
        if self.use_clip:
            parts.append(self.proj_clip(self._clip_tokens(clip_embeds)))  # (B, 1 or N, Dt)
        e_img = torch.cat(parts, dim=1)  # (B, L_img, Dt)
        e_max = e_img.max(dim=1, keepdim=True).values  # (B, 1, Dt)
        e_avg = e_img.mean(dim=1, keepdim=True)  # (B, 1, Dt)
        return torch.cat([e_img, e_max, e_avg], dim=1)  # (B, L_img + 2, Dt)

    def _decoupled(
        self, arcface_embeds: torch.Tensor, clip_embeds: torch.Tensor, text_states: torch.Tensor
    ) -> IdentityConditioning:
        e_i = self._clip_tokens(clip_embeds).mean(dim=1)  # (B, Dc): patch tokens averaged
        x = torch.cat([arcface_embeds, e_i], dim=-1)  # (B, Da + Dc)
        if self.norm_input is not None:
            x = self.norm_input(x)
        n, c = self.config.num_decoupled_tokens, self.config.cross_attention_dim
        tokens = self.proj_decoupled(x).reshape(x.shape[0], n, c)  # (B, n, C)
        return IdentityConditioning(context=text_states, id_tokens=self.norm_decoupled(tokens))

    # ------------------------------------------------------------------ forward
    def forward(
        self, arcface_embeds: torch.Tensor, clip_embeds: torch.Tensor, text_states: torch.Tensor
    ) -> IdentityConditioning:
        """(e_arc (B, Da), e_i (B, Dc) or (B, N, Dc), e_t (B, L, Dt)) -> IdentityConditioning."""
        cfg = self.config
        if arcface_embeds.dim() != 2 or arcface_embeds.shape[-1] != cfg.arcface_dim:
            raise ValueError(
                f"DiffIDAdapter: ArcFace embeddings must be (B, {cfg.arcface_dim}), "
                f"got {tuple(arcface_embeds.shape)}"
            )
        if text_states.dim() != 3 or text_states.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"DiffIDAdapter: text states must be (B, L, {cfg.text_dim}), got {tuple(text_states.shape)}"
            )
        dtype = next(self.parameters()).dtype
        arcface_embeds, clip_embeds = arcface_embeds.to(dtype), clip_embeds.to(dtype)
        if cfg.variant == "decoupled":
            return self._decoupled(arcface_embeds, clip_embeds, text_states)
        e_id = self.identity_tokens(arcface_embeds, clip_embeds)  # (B, L_id, Dt)
        e_t = text_states.to(dtype)  # (B, L, Dt)
        if self.norm_id is not None:
            e_id, e_t = self.norm_id(e_id), self.norm_text(e_t)
        id_tilde, t_tilde = self.shared_proj(e_id), self.shared_proj(e_t)  # eq. (7): one W_s, (B, *, D)
        if self.dual_attention is None:  # joint: plain concatenation
            fused = torch.cat([id_tilde, t_tilde], dim=1)  # (B, L_id + L, D)
        else:
            e_identity, e_attribute = self.dual_attention(id_tilde, t_tilde)
            if cfg.text_residual:
                e_attribute = e_attribute + t_tilde
            fused = torch.cat([e_identity, e_attribute], dim=1)  # eq. (13): (B, L_id + L, D)
        context = self.mlp(fused)  # eq. (14)-(15): (B, L_id + L, C)
        if cfg.text_start:
            n_id = e_id.shape[1]
            context = torch.cat([context[:, :n_id], context[:, n_id:] + text_states.to(dtype)], dim=1)
        return IdentityConditioning(context=context)

    def num_identity_tokens(self, num_patches: int = 1) -> int:
        """Identity tokens in the context (or ``id_tokens`` for ``decoupled``) for the configured inputs."""
        cfg = self.config
        if cfg.variant == "decoupled":
            return cfg.num_decoupled_tokens
        n_clip = num_patches if cfg.clip_tokens == "patch" else 1
        return int(self.use_arcface) + (n_clip if self.use_clip else 0) + 2
