"""Diffusion targets, x0 prediction and the time-weighted identity loss (Diff-ID sec. 3.3)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from idforge.models.adapter import DiffIDAdapter
from idforge.models.codec import VaeCodec
from idforge.models.face_encoder import FaceEncoder
from idforge.models.iresnet import IResNet, IResNetConfig
from idforge.models.losses import (IdentityLoss, IdentityLossConfig, diffusion_target, predict_x0,
                                   timestep_weight)

SCHED = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_timestep_weight_values():
    t = torch.tensor([0, 200, 500, 1000])
    w = timestep_weight(t, 1000, 5.0)
    assert w[0] == 1.0
    assert torch.allclose(w, torch.exp(-5.0 * t / 1000))
    assert math.isclose(float(w[-1]), math.exp(-5), rel_tol=1e-6)
    assert (w[1:] < w[:-1]).all()


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_inverts_the_exact_target(ptype):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 990])
    noisy = SCHED.add_noise(x0, noise, t)
    target = diffusion_target(noise, x0, t, SCHED.alphas_cumprod, ptype)
    assert torch.allclose(predict_x0(target, noisy, t, SCHED.alphas_cumprod, ptype), x0, atol=1e-3)


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long), SCHED.alphas_cumprod, "flow")


def _face_encoder():
    torch.manual_seed(0)
    return FaceEncoder(IResNet(IResNetConfig(layers=(1, 1, 1, 1), widths=(4, 8, 8, 8)))).freeze()


LMS = torch.tensor([[24.0, 28.0], [40.0, 28.0], [32.0, 38.0], [25.0, 47.0], [39.0, 47.0]])


def test_threshold_and_fraction_select_the_right_samples():
    loss = IdentityLoss(_face_encoder(), IdentityLossConfig(max_timestep=500))
    assert loss.select(torch.tensor([10, 600, 499, 900])).tolist() == [0, 2]
    frac = IdentityLoss(_face_encoder(), IdentityLossConfig(batch_fraction=0.5))
    picked = frac.select(torch.arange(8), torch.Generator().manual_seed(0))
    assert len(picked) == 4 and len(set(picked.tolist())) == 4


def test_loss_is_lambda_times_batch_mean_of_weighted_identity_term():
    enc = _face_encoder()
    cfg = IdentityLossConfig(lambda_id=0.1, k=5.0, max_timestep=500)
    loss = IdentityLoss(enc, cfg)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    t = torch.tensor([0, 100, 900])
    lms = LMS.expand(3, 5, 2)
    from idforge.models.align_torch import warp_to_template

    ref = enc(warp_to_template(torch.rand(3, 3, 64, 64), lms))
    out = loss(x0_hat=x, decode=lambda z: z, timesteps=t, landmarks=lms, reference_embeds=ref)
    emb = enc(warp_to_template(x, lms))
    cos = (emb * ref).sum(-1)
    expected = 0.1 * ((1 - cos[:2]) * torch.exp(-5.0 * t[:2] / 1000)).sum() / 3
    assert out.num_used == 2
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.allclose(out.id_cosine, cos[:2].mean(), atol=1e-6)


def test_face_window_covering_the_latent_equals_full_decode():
    enc = _face_encoder()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    lms = LMS.expand(2, 5, 2)
    boxes = torch.tensor([[16.0, 16.0, 48.0, 56.0]]).expand(2, 4)
    ref = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    t = torch.tensor([10, 20])
    full = IdentityLoss(enc, IdentityLossConfig())(x0_hat=x, decode=lambda z: z, timesteps=t, landmarks=lms,
                                                   reference_embeds=ref)
    win = IdentityLoss(enc, IdentityLossConfig(face_window=64, latent_scale=1))(
        x0_hat=x, decode=lambda z: z, timesteps=t, landmarks=lms, reference_embeds=ref, boxes=boxes)
    assert torch.allclose(full.loss, win.loss)
    # a smaller window around the face sees the same face pixels: landmarks are shifted with it
    small = IdentityLoss(enc, IdentityLossConfig(face_window=48, latent_scale=1))(
        x0_hat=x, decode=lambda z: z, timesteps=t, landmarks=lms, reference_embeds=ref, boxes=boxes)
    assert torch.allclose(small.id_cosine, full.id_cosine, atol=0.05)


def test_gradient_reaches_unet_and_adapter_but_not_vae_or_arcface():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    codec = VaeCodec(vae)
    enc = _face_encoder()
    adapter = DiffIDAdapter(arcface_dim=512, clip_dim=8, text_dim=16, cross_attention_dim=16)
    frozen_before = {k: v.clone() for k, v in list(vae.state_dict().items()) + list(enc.state_dict().items())}
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z0 = codec.encode(x)
    noise = torch.randn_like(z0)
    t = torch.tensor([5, 50])
    noisy = SCHED.add_noise(z0, noise, t)
    cond = adapter(torch.randn(2, 512), torch.randn(2, 8), torch.randn(2, 5, 16))
    pred = unet(noisy, t, encoder_hidden_states=cond.context).sample
    x0_hat = predict_x0(pred, noisy, t, SCHED.alphas_cumprod, "epsilon")
    loss = IdentityLoss(enc, IdentityLossConfig(lambda_id=1.0))
    lms = (LMS / 4).expand(2, 5, 2)
    out = loss(x0_hat=x0_hat, decode=codec.decode, timesteps=t, landmarks=lms,
               reference_embeds=torch.nn.functional.normalize(torch.randn(2, 512), dim=-1))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None and not p.requires_grad for p in vae.parameters())
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    opt = torch.optim.SGD(list(unet.parameters()) + list(adapter.parameters()), lr=0.1)
    opt.step()
    after = dict(list(vae.state_dict().items()) + list(enc.state_dict().items()))
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_fraction"):
        IdentityLossConfig(batch_fraction=0)
    with pytest.raises(ValueError, match="boxes"):
        IdentityLoss(_face_encoder(), IdentityLossConfig(face_window=8, latent_scale=1))(
            x0_hat=torch.zeros(1, 3, 32, 32), decode=lambda z: z, timesteps=torch.tensor([1]),
            landmarks=LMS[None] / 2, reference_embeds=torch.randn(1, 512))
