"""Attention processors that feed identity tokens into a diffusers UNet (the adapter's ``decoupled`` variant).

IP-Adapter's decoupled cross-attention (Ye et al. 2023, sec. 3.2, eq. (4)-(5)), used as a baseline
beside Diff-ID's context replacement: each cross-attention layer keeps its text attention and adds

    Z = Attention(Q, K_text, V_text) + gate * scale * Attention(Q, W'_k c_id, W'_v c_id)

with new projections ``to_k_id`` / ``to_v_id`` (cross_attention_dim -> hidden) and a learnable
``gate`` initialised to ZERO, so an untrained adapter leaves the UNet's output exactly unchanged
(IP-Adapter itself uses a fixed scale; the zero gate is the litgpt-style choice of STYLE.md 5).
``scale`` is an inference-time knob passed as ``cross_attention_kwargs={"id_scale": ...}``.

Identity tokens travel explicitly as ``cross_attention_kwargs={"id_tokens": ...}``, never
concatenated onto the text states. Self-attention layers get :class:`PassThroughAttnProcessor`,
the stock computation with a signature that accepts those arguments, so diffusers neither warns
nor drops them. :func:`iter_attention_layers` is the one place that walks a UNet's attention layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

log = logging.getLogger(__name__)

PROCESSOR_WEIGHTS = "identity_processors.safetensors"


def iter_attention_layers(unet: nn.Module) -> Iterator[tuple[str, int, int | None]]:
    """Yield (processor name, hidden size, cross-attention dim or None) for each attention layer.

    The name is the key of ``unet.attn_processors`` (e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor``); sizes are read from the
    ``Attention`` module itself, never parsed from block names.
    """
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            hidden = (
                int(module.to_q.out_features)
                if hasattr(module.to_q, "out_features")
                else int(module.inner_dim)
            )
            cross = int(module.to_k.in_features) if module.is_cross_attention else None
            yield f"{name}.processor", hidden, cross


def processor_key(layer_name: str) -> str:
    """A ModuleDict key derived from the layer name ('.' is not allowed in module names)."""
    return layer_name.removesuffix(".processor").replace(".", "__")


class PassThroughAttnProcessor(AttnProcessor2_0):
    """Diffusers' stock SDPA attention that accepts (and ignores) ``id_tokens``, ``id_scale`` and ``reference``."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        id_tokens: torch.Tensor | None = None,
        id_scale: float = 1.0,
        reference=None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def is_stock_processor(proc) -> bool:
    """diffusers' plain processors or the pass-through: nothing of idforge's own (a reference or identity
    processor) that an installer must keep on the layer."""
    return type(proc) in (AttnProcessor2_0, AttnProcessor, PassThroughAttnProcessor)


class IdentityAttnProcessor(nn.Module):
    """Text cross-attention plus a zero-gated attention over identity tokens (IP-Adapter eq. (5))."""

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        id_tokens: torch.Tensor | None = None,
        id_scale: float = 1.0,
        reference=None,
    ) -> torch.Tensor:
        # ``reference`` (ReferenceNet features) is for the self-attention layers; accepted and ignored here.
        # Mirrors diffusers' AttnProcessor2_0 op for op, so the text path is bit-identical to it.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(
                1, 2
            )  # (B, HW, C)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )  # (B, h, Lq, Lk)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, L, d)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )  # (B, h, Lq, d)
        if id_tokens is not None:
            if id_tokens.shape[0] != batch_size or id_tokens.shape[-1] != self.cross_attention_dim:
                raise ValueError(
                    f"IdentityAttnProcessor: id_tokens must be ({batch_size}, n, "
                    f"{self.cross_attention_dim}), got {tuple(id_tokens.shape)}"
                )
            id_tokens = id_tokens.to(query.dtype)
            id_key, id_value = heads(self.to_k_id(id_tokens)), heads(self.to_v_id(id_tokens))
            if attn.norm_k is not None:
                id_key = attn.norm_k(id_key)
            out_id = F.scaled_dot_product_attention(query, id_key, id_value, dropout_p=0.0, is_causal=False)
            out = out + (self.gate * id_scale).to(query.dtype) * out_id
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)  # (B, Lq, C)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)  # (B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_identity_processors(
    unet: nn.Module, cross_attention_dim: int, init_from_text: bool = True
) -> nn.ModuleDict:
    """Set :class:`IdentityAttnProcessor` on every cross-attention layer, the pass-through elsewhere.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any model with ``set_attn_processor``).
        cross_attention_dim: width of the identity tokens.
        init_from_text: start ``to_k_id``/``to_v_id`` as copies of the layer's text ``to_k``/``to_v``
            where the shapes match (IP-Adapter's initialisation); the zero gate keeps the output
            unchanged either way.

    Returns:
        The new processors keyed by :func:`processor_key` of their layer name. The same modules sit
        in the UNet, so their parameters also appear in ``unet.state_dict()`` as
        ``<layer>.processor.{to_k_id.weight, to_v_id.weight, gate}``.
    """
    procs: dict[str, nn.Module] = {}
    trainable = nn.ModuleDict()
    attn_modules = dict(unet.named_modules())
    for name, hidden, cross in iter_attention_layers(unet):
        if cross is None:
            procs[name] = PassThroughAttnProcessor()
            continue
        attn = attn_modules[name.removesuffix(".processor")]
        ref = attn.to_k.weight
        proc = IdentityAttnProcessor(hidden, cross_attention_dim).to(device=ref.device, dtype=ref.dtype)
        if init_from_text and attn.to_k.weight.shape == proc.to_k_id.weight.shape:
            with torch.no_grad():
                proc.to_k_id.weight.copy_(attn.to_k.weight)
                proc.to_v_id.weight.copy_(attn.to_v.weight)
        procs[name] = proc
        trainable[processor_key(name)] = proc
    if not trainable:
        raise ValueError(
            "install_identity_processors: the UNet has no cross-attention layer to attach identity tokens to"
        )
    passthrough = len(procs) - len(trainable)
    unet.set_attn_processor(procs)  # diffusers pops the entries it sets: count before
    log.info("installed %d identity attention processors (%d pass-through)", len(trainable), passthrough)
    return trainable


def identity_processors(unet: nn.Module) -> nn.ModuleDict:
    """The :class:`IdentityAttnProcessor` modules installed on ``unet``, keyed by :func:`processor_key`."""
    return nn.ModuleDict(
        {
            processor_key(name): proc
            for name, proc in unet.attn_processors.items()
            if isinstance(proc, IdentityAttnProcessor)
        }
    )


def processor_state_dict(unet: nn.Module, kind: type) -> dict[str, torch.Tensor]:
    """The tensors of the UNet's processors of type ``kind``, keyed as in ``unet.state_dict()``
    (``<layer>.processor.<param>``): what an adapter ships without the UNet."""
    return {
        f"{name}.{key}": value.detach().contiguous()
        for name, proc in unet.attn_processors.items()
        if isinstance(proc, kind)
        for key, value in proc.state_dict().items()
    }


def save_processors(unet: nn.Module, kind: type, folder: str | Path, file_name: str, installer: str) -> Path:
    """Write the weights of the ``kind`` processors alone to ``<folder>/<file_name>`` (safetensors)."""
    from safetensors.torch import save_file

    state = processor_state_dict(unet, kind)
    if not state:
        raise ValueError(f"no {kind.__name__} is installed on this UNet; call {installer} first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / file_name)
    return folder / file_name


def load_processors(unet: nn.Module, kind: type, path: str | Path, file_name: str, installer: str) -> None:
    """Load weights written by :func:`save_processors` (folder or file) into the installed ``kind``
    processors; the key sets must match exactly (no silent partial load)."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / file_name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no {kind.__name__} weights (written with save_pretrained / export)")
    state = load_file(file)
    expected = set(processor_state_dict(unet, kind))
    if not expected:
        raise ValueError(f"load {file}: no {kind.__name__} on the UNet; call {installer} first")
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"load {file}: keys do not match the installed {kind.__name__}s (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); call {installer} with the layout it was saved with first"
        )
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, kind):
            prefix = f"{name}."
            proc.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
            )


def identity_processor_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The identity processors' tensors, keyed as in ``unet.state_dict()``."""
    return processor_state_dict(unet, IdentityAttnProcessor)


def save_identity_processors(unet: nn.Module, folder: str | Path) -> Path:
    """Write the identity processors' weights alone to ``<folder>/identity_processors.safetensors``."""
    return save_processors(
        unet, IdentityAttnProcessor, folder, PROCESSOR_WEIGHTS, "install_identity_processors"
    )


def load_identity_processors(unet: nn.Module, path: str | Path) -> None:
    """Load weights written by :func:`save_identity_processors` (folder or file); keys must match exactly."""
    load_processors(unet, IdentityAttnProcessor, path, PROCESSOR_WEIGHTS, "install_identity_processors")
