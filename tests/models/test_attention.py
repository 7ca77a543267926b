"""Identity attention processors (decoupled variant): zero gate = base UNet; save/reload reproduces."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from idforge.models.attention import install_identity_processors, iter_attention_layers


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _run(unet, tokens=None):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    kwargs = None if tokens is None else {"id_tokens": tokens}
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, cross_attention_kwargs=kwargs).sample


def test_walker_reports_every_attention_layer_with_its_sizes():
    unet = _unet()
    layers = list(iter_attention_layers(unet))
    assert len(layers) == len(unet.attn_processors)
    assert {name for name, _, _ in layers} == set(unet.attn_processors)
    cross = [(h, c) for _, h, c in layers if c is not None]
    assert cross and all(c == 16 for _, c in cross)


def test_zero_gate_equals_the_base_unet_and_a_gate_changes_it(tmp_path):
    x_base = _run(_unet())
    unet = _unet()
    procs = install_identity_processors(unet, cross_attention_dim=16)
    tokens = torch.randn(2, 4, 16)
    assert torch.allclose(_run(unet, tokens), x_base, atol=1e-5)
    with torch.no_grad():
        for p in procs.values():
            p.gate.fill_(1.0)
    changed = _run(unet, tokens)
    assert not torch.allclose(changed, _run(unet, torch.zeros_like(tokens)), atol=1e-4)
    keys = {k for k in unet.state_dict() if ".processor." in k}
    assert keys and all(k.endswith(("to_k_id.weight", "to_v_id.weight", "gate")) for k in keys)
    torch.save({k: unet.state_dict()[k] for k in keys}, tmp_path / "p.pt")
    fresh = _unet()
    install_identity_processors(fresh, cross_attention_dim=16)
    fresh.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True), strict=False)
    assert torch.allclose(_run(fresh, tokens), changed, atol=1e-6)
