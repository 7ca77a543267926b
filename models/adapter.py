"""Diff-ID identity adapter: projections, pooling, shared W_s, dual cross-attention, fusion MLP.

Diff-ID (paper 004), sec. 3.2 and appendix A.1, eq. (6)-(15):

    e'_arc = W_arc e_arc,  e'_i = W_i e_i                      (6)  bias-free, to the text width
    e_img = [e'_arc ; e'_i],  e_max = MaxPool(e_img),  e_avg = AvgPool(e_img)   (pooled over tokens)
    e_id  = [e'_arc ; e'_i ; e_max ; e_avg]                     identity tokens (4 with pooled CLIP)
    ~e_id = W_s e_id,  ~e_t = W_s e_t                          (7)  ONE shared, bias-free W_s
    e_identity  = (Q_id K_id^T / sqrt(d)) V_id,  Q_id = Wq_id ~e_id, K_id, V_id from ~e_t     (9)-(10)
    e_attribute = (Q_at K_at^T / sqrt(d)) V_at,  Q_at = Wq_at ~e_t,  K_at, V_at from ~e_id    (11)-(12)
    e_fused = [e_identity ; e_attribute]  (tokens),  e_refined = ReLU(W2 ReLU(W1 e_fused + b1) + b2)  (13)-(15)

No softmax by default (the paper drops it to keep magnitudes). Because every path to the context
goes through the identity tokens, a zeroed identity input gives a constant context in the
``final`` variant (text reaches the UNet only through e_attribute = f(e_t) x V(e_id)); the opt-in
``text_residual`` switch (not in the paper) adds ~e_t to e_attribute for a text path that
survives identity dropout.

Variants (Diff-ID Table 2 plus a baseline): ``arcface`` (e_img = [e'_arc]), ``clip`` (e_img = [e'_i]),
``joint`` ([~e_id ; ~e_t] straight into the MLP, no dual attention), ``final`` (the full adapter), and
``decoupled`` (IP-Adapter style: text states go to the UNet unchanged and the identity tokens,
projected to the UNet's cross-attention width, reach it through separate K/V in
:class:`idforge.models.attention.IdentityAttnProcessor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

VARIANTS = ("final", "joint", "arcface", "clip", "decoupled")


@dataclass
class IdentityConditioning:
    """What the UNet receives: the cross-attention context and, for ``decoupled``, identity tokens."""

    context: torch.Tensor  # (B, L_ctx, cross_attention_dim)
    id_tokens: torch.Tensor | None = None  # (B, n, cross_attention_dim)


def product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, softmax: bool,
                      normalize_by_length: bool) -> torch.Tensor:
    """(Q K^T / sqrt(d)) V per head; softmax over keys only when asked (Diff-ID eq. 9 omits it)."""
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // num_heads
    q = q.view(b, lq, num_heads, d).transpose(1, 2)  # (B, h, Lq, d)
    k = k.view(b, lk, num_heads, d).transpose(1, 2)  # (B, h, Lk, d)
    v = v.view(b, lk, num_heads, d).transpose(1, 2)  # (B, h, Lk, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, Lq, Lk)
    if softmax:
        scores = scores.softmax(-1)
    elif normalize_by_length:
        scores = scores / lk
    return (scores @ v).transpose(1, 2).reshape(b, lq, c)  # (B, Lq, C)


class DualCrossAttention(nn.Module):
    """Diff-ID eq. (9)-(12): identity queries attend to text; text queries attend to identity."""

    def __init__(self, dim: int, num_heads: int = 1, softmax: bool = False, normalize_by_length: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.softmax, self.normalize_by_length = num_heads, softmax, normalize_by_length
        self.to_q_id = nn.Linear(dim, dim, bias=False)
        self.to_k_id = nn.Linear(dim, dim, bias=False)
        self.to_v_id = nn.Linear(dim, dim, bias=False)
        self.to_q_attr = nn.Linear(dim, dim, bias=False)
        self.to_k_attr = nn.Linear(dim, dim, bias=False)
        self.to_v_attr = nn.Linear(dim, dim, bias=False)

    def forward(self, id_tokens: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(~e_id (B, L_id, D), ~e_t (B, L_t, D)) -> (e_identity (B, L_id, D), e_attribute (B, L_t, D))."""
        attn = lambda q, k, v: product_attention(q, k, v, self.num_heads, self.softmax,  # noqa: E731
                                                 self.normalize_by_length)
        e_identity = attn(self.to_q_id(id_tokens), self.to_k_id(text_tokens), self.to_v_id(text_tokens))
        e_attribute = attn(self.to_q_attr(text_tokens), self.to_k_attr(id_tokens), self.to_v_attr(id_tokens))
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


class DiffIDAdapter(ModelMixin, ConfigMixin):
    """The identity adapter; ``forward(e_arc, e_i, e_t) -> IdentityConditioning``."""

    @register_to_config
    def __init__(self, variant: str = "final", arcface_dim: int = 512, clip_dim: int = 1024, text_dim: int = 768,
                 cross_attention_dim: int = 768, attention_dim: int | None = None, mlp_hidden_dim: int | None = None,
                 num_heads: int = 1, softmax: bool = False, normalize_by_length: bool = False,
                 input_layernorm: bool = False, final_activation: bool = True, clip_tokens: str = "pooled",
                 text_residual: bool = False):
        """
        Args:
            variant: one of ``final`` (paper), ``joint``, ``arcface``, ``clip``, ``decoupled``.
            arcface_dim / clip_dim / text_dim: widths of e_arc, e_i and e_t.
            cross_attention_dim: the UNet's context width (768 for SD1.5).
            attention_dim: width of W_s's output and the dual attention (default: text_dim).
            mlp_hidden_dim: fusion-MLP hidden width (default: 2 x attention_dim).
            num_heads: heads of the dual cross-attention (paper: 1).
            softmax: apply softmax over keys (paper: no).
            normalize_by_length: divide the no-softmax product by the key length.
            input_layernorm: LayerNorm on e_id and e_t before W_s.
            final_activation: keep the MLP's final ReLU (paper: yes).
            clip_tokens: ``pooled`` (one token) or ``patch`` (one token per patch).
            text_residual: add ~e_t to e_attribute (a stabiliser, not in the paper).
        """
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if clip_tokens not in ("pooled", "patch"):
            raise ValueError(f"clip_tokens must be 'pooled' or 'patch', got {clip_tokens!r}")
        attn_dim = attention_dim or text_dim
        hidden = mlp_hidden_dim or 2 * attn_dim
        self.use_arcface = variant != "clip"
        self.use_clip = variant != "arcface"
        # W_arc and W_i map into the text width: the one W_s is applied to both e_id and e_t.
        self.proj_arcface = nn.Linear(arcface_dim, text_dim, bias=False) if self.use_arcface else None
        self.proj_clip = nn.Linear(clip_dim, text_dim, bias=False) if self.use_clip else None
        self.norm_id = nn.LayerNorm(text_dim) if input_layernorm else None
        self.norm_text = nn.LayerNorm(text_dim) if input_layernorm else None
        self.shared_proj = nn.Linear(text_dim, attn_dim, bias=False)  # W_s
        if variant == "decoupled":
            self.id_out = nn.Sequential(nn.Linear(attn_dim, cross_attention_dim), nn.LayerNorm(cross_attention_dim))
        else:
            self.dual_attention = DualCrossAttention(attn_dim, num_heads, softmax, normalize_by_length) \
                if variant != "joint" else None
            self.mlp = FusionMLP(attn_dim, hidden, cross_attention_dim, final_activation)

    def identity_tokens(self, arcface_embeds: torch.Tensor, clip_embeds: torch.Tensor) -> torch.Tensor:
        """e_id = [e'_arc ; e'_i ; MaxPool(e_img) ; AvgPool(e_img)]: (B, L_id, text_dim)."""
        parts = []
        if self.use_arcface:
            parts.append(self.proj_arcface(arcface_embeds).unsqueeze(1))  # (B, 1, D)
        if self.use_clip:
            e_i = clip_embeds if clip_embeds.dim() == 3 else clip_embeds.unsqueeze(1)  # (B, 1 or N, D_clip)
            if self.config.clip_tokens == "pooled" and e_i.shape[1] != 1:
                raise ValueError(f"clip_tokens='pooled' expects (B, D) CLIP embeddings, got {tuple(clip_embeds.shape)}")
            parts.append(self.proj_clip(e_i))
        e_img = torch.cat(parts, dim=1)  # (B, L_img, D)
        e_max = e_img.max(dim=1, keepdim=True).values  # (B, 1, D)
        e_avg = e_img.mean(dim=1, keepdim=True)  # (B, 1, D)
        return torch.cat([e_img, e_max, e_avg], dim=1)

    def forward(self, arcface_embeds: torch.Tensor, clip_embeds: torch.Tensor,
                text_states: torch.Tensor) -> IdentityConditioning:
        dtype = self.shared_proj.weight.dtype
        e_id = self.identity_tokens(arcface_embeds.to(dtype), clip_embeds.to(dtype))
        e_t = text_states.to(dtype)
        if self.norm_id is not None:
            e_id, e_t = self.norm_id(e_id), self.norm_text(e_t)
        id_tilde, t_tilde = self.shared_proj(e_id), self.shared_proj(e_t)  # eq. (7): one W_s
        variant = self.config.variant
        if variant == "decoupled":
            return IdentityConditioning(context=text_states, id_tokens=self.id_out(id_tilde))
        if variant == "joint":
            fused = torch.cat([id_tilde, t_tilde], dim=1)  # (B, L_id + L_t, D)
        else:
            e_identity, e_attribute = self.dual_attention(id_tilde, t_tilde)
            if self.config.text_residual:
                e_attribute = e_attribute + t_tilde
            fused = torch.cat([e_identity, e_attribute], dim=1)  # (B, L_id + L_t, D)
        return IdentityConditioning(context=self.mlp(fused))
