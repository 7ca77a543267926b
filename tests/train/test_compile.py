"""The compile switch compiles the UNet in place: same keys, same outputs (eager backend on CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from idforge.models.zoo import TinyConfig, tiny_unet
from idforge.train.compile import CompileUNet


def test_compile_callback_compiles_the_unet_in_place_and_keeps_its_outputs():
    unet = tiny_unet(TinyConfig(), seed=0).eval()
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        before = unet(x, t, ctx).sample
    keys = list(unet.state_dict())
    module = SimpleNamespace(model=SimpleNamespace(unet=unet))
    CompileUNet(backend="eager").setup(None, module, "fit")
    assert unet._compiled_call_impl is not None  # forward now runs through torch.compile
    assert list(unet.state_dict()) == keys  # checkpoints, EMA and export see the same keys
    with torch.no_grad():
        assert torch.allclose(unet(x, t, ctx).sample, before, atol=1e-6)
