"""Attention processors that feed identity tokens into a diffusers UNet (the ``decoupled`` variant).

IP-Adapter-style decoupled cross-attention (Ye et al. 2023, eq. 4-5), used as an extra baseline to
Diff-ID's context replacement: every cross-attention layer keeps its text attention and adds

    Z = Attn(Q, K_text, V_text) + gate * Attn(Q, W'_k c_id, W'_v c_id)

with new projections ``to_k_id`` / ``to_v_id`` and a gate initialised to zero, so an untrained
adapter leaves the UNet's output exactly unchanged. Identity tokens travel explicitly as
``cross_attention_kwargs={"id_tokens": ...}``; self-attention layers get a processor that accepts
and ignores that argument. :func:`iter_attention_layers` is the one place that walks the UNet.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


def iter_attention_layers(unet) -> Iterator[tuple[str, int, int | None]]:
    """Yield (processor name, hidden size, cross-attention dim or None) for every attention layer."""
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            cross = module.to_k.in_features if module.is_cross_attention else None
            yield f"{name}.processor", int(module.to_q.out_features), cross


class SelfAttnProcessor(AttnProcessor2_0):
    """Stock attention that also accepts (and ignores) ``id_tokens``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_tokens=None, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class IdentityAttnProcessor(nn.Module):
    """Text cross-attention plus a zero-gated attention over identity tokens."""

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_tokens: torch.Tensor | None = None, **kwargs):
        residual = hidden_states
        b, n, _ = hidden_states.shape  # (B, L, C)
        if attn.norm_cross and encoder_hidden_states is not None:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads
        q = attn.to_q(hidden_states)
        split = lambda x: x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731  (B, h, L, d)
        out = F.scaled_dot_product_attention(split(q), split(attn.to_k(context)), split(attn.to_v(context)))
        if id_tokens is not None:
            id_tokens = id_tokens.to(q.dtype)
            out_id = F.scaled_dot_product_attention(split(q), split(self.to_k_id(id_tokens)),
                                                    split(self.to_v_id(id_tokens)))
            out = out + self.gate.to(q.dtype) * out_id
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, L, C)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_identity_processors(unet, cross_attention_dim: int) -> nn.ModuleDict:
    """Set ``IdentityAttnProcessor`` on cross-attention layers (others: :class:`SelfAttnProcessor`).

    Returns the new processors keyed by layer name ('.' replaced by '__'), whose parameters also
    live in ``unet.state_dict()`` under ``<layer>.processor.*``.
    """
    procs, trainable = {}, nn.ModuleDict()
    for name, hidden, cross in iter_attention_layers(unet):
        if cross is None:
            procs[name] = SelfAttnProcessor()
        else:
            proc = IdentityAttnProcessor(hidden, cross_attention_dim)
            procs[name] = proc
            trainable[name.replace(".", "__")] = proc
    unet.set_attn_processor(procs)
    return trainable
