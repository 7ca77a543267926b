"""Face position mask (FlashFace sec. 3.2): zero-initialised conv_in widening, box mask, inpainting input."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from idforge.models.face_mask import box_mask, face_mask_input, masked_latent, widen_conv_in
from idforge.models.zoo import TinyConfig, tiny_unet

UNET = TinyConfig(resolution=16, unet_channels=(16, 32), cross_attention_dim=16, attention_head_dim=8)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 16, generator=g)


def _run(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def test_box_mask_marks_the_latent_cells_the_box_overlaps():
    boxes = torch.tensor([[16.0, 8.0, 40.0, 32.0], [0.0, 0.0, 64.0, 64.0]])
    mask = box_mask(boxes, image_size=(64, 64), latent_size=(8, 8))  # 8 px per cell
    assert mask.shape == (2, 1, 8, 8)
    expected = torch.zeros(8, 8)
    expected[1:4, 2:5] = 1  # rows 8..32 px -> cells 1..3, columns 16..40 px -> cells 2..4
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.ones(8, 8))


def test_zero_initialised_mask_channels_leave_the_unet_output_unchanged():
    x, t, ctx = _inputs()
    base = _run(tiny_unet(UNET, seed=0), x, t, ctx)
    mask = box_mask(torch.tensor([[2.0, 2.0, 10.0, 12.0]] * 2), (16, 16), (8, 8))
    for extra, latent in ((1, None), (5, torch.randn(2, 4, 8, 8))):
        unet = widen_conv_in(tiny_unet(UNET, seed=0), extra)
        assert unet.conv_in.in_channels == 4 + extra and unet.config.in_channels == 4 + extra
        inp = face_mask_input(x, mask, latent)
        assert inp.shape[1] == 4 + extra
        torch.testing.assert_close(_run(unet, inp, t, ctx), base, rtol=0, atol=1e-6)
    with torch.no_grad():
        unet.conv_in.weight[:, 4].fill_(0.5)  # a trained mask channel changes the output
    assert (_run(unet, face_mask_input(x, mask, latent), t, ctx) - base).abs().max() > 1e-3


def test_inpainting_input_is_noisy_mask_and_the_latent_with_the_face_zeroed():
    x, latent = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = box_mask(torch.tensor([[4.0, 4.0, 8.0, 8.0]] * 2), (16, 16), (8, 8))
    inp = face_mask_input(x, mask, latent)
    assert torch.equal(inp[:, :4], x) and torch.equal(inp[:, 4:5], mask)
    assert torch.equal(inp[:, 5:], masked_latent(latent, mask))
    assert torch.equal(inp[:, 5:][mask.expand(-1, 4, -1, -1) > 0], torch.zeros(2 * 4 * 4))
    outside = mask.expand(-1, 4, -1, -1) == 0
    assert torch.equal(inp[:, 5:][outside], latent[outside])
    dropped = face_mask_input(x, mask, latent, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0, 4:], torch.zeros(5, 8, 8)) and torch.equal(dropped[1], inp[1])


def test_widened_unet_round_trips_through_save_pretrained(tmp_path):
    unet = widen_conv_in(tiny_unet(UNET, seed=0), 1)
    with torch.no_grad():
        unet.conv_in.weight[:, 4].normal_()
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert loaded.config.in_channels == 5
    x, t, ctx = _inputs()
    inp = torch.cat([x, torch.ones(2, 1, 8, 8)], dim=1)
    assert torch.equal(_run(loaded, inp, t, ctx), _run(unet, inp, t, ctx))
