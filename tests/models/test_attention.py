"""Identity attention processors (decoupled variant): zero gate = base UNet; a gate changes it; reload
reproduces it."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from idforge.models.attention import (
    IdentityAttnProcessor,
    PassThroughAttnProcessor,
    identity_processor_state_dict,
    identity_processors,
    install_identity_processors,
    iter_attention_layers,
    load_identity_processors,
    processor_key,
    save_identity_processors,
)
from idforge.models.zoo import TinyConfig, tiny_unet
from safetensors.torch import save_file

# 8 x 8 latents, 16-d cross-attention at the full-resolution level only
UNET = TinyConfig(
    resolution=16,
    unet_channels=(16, 32),
    unet_attention=(True, False),
    cross_attention_dim=16,
    attention_head_dim=8,
)


def _unet():
    unet = tiny_unet(UNET, seed=0)
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def _run(unet, tokens=None, **extra):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    kwargs = None if tokens is None else {"id_tokens": tokens, **extra}
    with torch.no_grad():
        return unet(
            x, torch.tensor([10, 500]), encoder_hidden_states=ctx, cross_attention_kwargs=kwargs
        ).sample


def _set_gates(procs, value):
    with torch.no_grad():
        for p in procs.values():
            p.gate.fill_(value)


def test_walker_reports_every_attention_layer_with_its_sizes():
    unet = _unet()
    layers = list(iter_attention_layers(unet))
    assert len(layers) == len(unet.attn_processors)
    assert {name for name, _, _ in layers} == set(unet.attn_processors)
    modules = dict(unet.named_modules())
    for name, hidden, cross in layers:
        attn = modules[name.removesuffix(".processor")]
        assert hidden == attn.to_out[0].in_features  # the attention's own width
        assert (cross is None) == name.endswith("attn1.processor")
        assert cross in (None, 16)
    assert {h for _, h, c in layers if c} == {16, 32}  # down block (16) and up block (32) widths


def test_zero_gate_equals_the_base_unet_exactly_and_a_gate_changes_it():
    x_base = _run(_unet())
    unet = _unet()
    procs = install_identity_processors(unet, cross_attention_dim=16)
    tokens = torch.randn(2, 4, 16)
    assert all(float(p.gate.detach()) == 0.0 for p in procs.values())
    assert torch.equal(_run(unet, tokens), x_base)
    assert torch.equal(_run(unet), x_base)  # no identity tokens at all
    _set_gates(procs, 1.0)
    changed = _run(unet, tokens)
    assert not torch.allclose(changed, x_base, atol=1e-4)
    assert not torch.allclose(changed, _run(unet, torch.randn(2, 4, 16)), atol=1e-4)
    assert torch.equal(_run(unet, tokens, id_scale=0.0), x_base)  # inference-time scale


def test_processor_keys_follow_layer_names_and_live_in_the_unet_state_dict():
    unet = _unet()
    procs = install_identity_processors(unet, cross_attention_dim=16)
    cross = [name for name, _, c in iter_attention_layers(unet) if c is not None]
    assert set(procs) == {processor_key(n) for n in cross}
    assert (
        processor_key("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor")
        == "down_blocks__0__attentions__0__transformer_blocks__0__attn2"
    )
    keys = {k for k in unet.state_dict() if ".processor." in k}
    assert keys == {f"{n}.{p}" for n in cross for p in ("to_k_id.weight", "to_v_id.weight", "gate")}
    for name, proc in unet.attn_processors.items():
        assert isinstance(proc, IdentityAttnProcessor if name in cross else PassThroughAttnProcessor)


def test_id_tokens_reach_every_layer_without_diffusers_warning(caplog):
    unet = _unet()
    install_identity_processors(unet, cross_attention_dim=16)
    with caplog.at_level(logging.WARNING):
        _run(unet, torch.randn(2, 4, 16))
    assert "not expected" not in caplog.text
    with pytest.raises(ValueError, match="id_tokens must be"):
        _run(unet, torch.randn(2, 4, 15))


def test_identity_projections_start_from_the_text_projections():
    unet = _unet()
    procs = install_identity_processors(unet, cross_attention_dim=16)
    modules = dict(unet.named_modules())
    for key, proc in procs.items():
        attn = modules[key.replace("__", ".")]
        assert torch.equal(proc.to_k_id.weight, attn.to_k.weight) and torch.equal(
            proc.to_v_id.weight, attn.to_v.weight
        )


def test_gradients_reach_gate_first_and_projections_once_the_gate_opens():
    unet = _unet()
    procs = install_identity_processors(unet, cross_attention_dim=16)
    g = torch.Generator().manual_seed(1)
    x, ctx, tok = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 5, 16, generator=g),
        torch.randn(2, 4, 16),
    )
    unet(
        x, torch.tensor([10, 500]), encoder_hidden_states=ctx, cross_attention_kwargs={"id_tokens": tok}
    ).sample.square().mean().backward()
    proc = next(iter(procs.values()))
    assert proc.gate.grad is not None and proc.gate.grad.abs() > 0
    assert proc.to_k_id.weight.grad is None or proc.to_k_id.weight.grad.abs().sum() == 0


def test_save_and_reload_reproduces_the_output(tmp_path):
    unet = _unet()
    procs = install_identity_processors(unet, cross_attention_dim=16)
    _set_gates(procs, 0.7)
    with torch.no_grad():
        for p in procs.values():
            p.to_k_id.weight.add_(0.1 * torch.randn_like(p.to_k_id.weight))
    tokens = torch.randn(2, 4, 16)
    changed = _run(unet, tokens)
    path = save_identity_processors(unet, tmp_path / "adapter")
    assert path.suffix == ".safetensors"
    fresh = _unet()
    install_identity_processors(fresh, cross_attention_dim=16)
    assert not torch.equal(_run(fresh, tokens), changed)
    load_identity_processors(fresh, tmp_path / "adapter")
    assert torch.equal(_run(fresh, tokens), changed)
    assert set(identity_processors(fresh)) == set(procs)
    assert set(identity_processor_state_dict(fresh)) == {k for k in fresh.state_dict() if ".processor." in k}


def test_loading_rejects_weights_from_another_layout(tmp_path):
    unet = _unet()
    install_identity_processors(unet, cross_attention_dim=16)
    state = identity_processor_state_dict(unet)
    save_file({k.replace("up_blocks", "mid_block"): v for k, v in state.items()}, tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="do not match"):
        load_identity_processors(unet, tmp_path / "p.safetensors")
