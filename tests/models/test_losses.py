"""Diffusion targets, x0 prediction and the time-weighted identity loss (Diff-ID sec. 3.3, eq. (16)-(21))."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from idforge.models.adapter import DiffIDAdapter
from idforge.models.codec import VaeCodec
from idforge.models.face.align_torch import warp_to_template
from idforge.models.losses import (
    IdentityLoss,
    IdentityLossConfig,
    diffusion_target,
    predict_x0,
    timestep_weight,
)
from idforge.models.zoo import TinyConfig, tiny_face_encoder, tiny_unet, tiny_vae

SCHED = DDPMScheduler(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
)
LMS = torch.tensor([[24.0, 28.0], [40.0, 28.0], [32.0, 38.0], [25.0, 47.0], [39.0, 47.0]])  # a face in 64 px
# 8 x 8 latents of 16 x 16 images, 16-d cross-attention at the second UNet level only, a narrow
# VAE and a narrow ArcFace
TINY = TinyConfig(
    resolution=16,
    unet_channels=(16, 32),
    unet_attention=(False, True),
    cross_attention_dim=16,
    attention_head_dim=8,
    vae_channels=(8, 16),
    face_widths=(4, 8, 8, 8),
)


def _face_encoder():
    return tiny_face_encoder(TINY, seed=0).freeze()


def _pixels(n, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_timestep_weight_values():
    t = torch.tensor([0, 200, 500, 1000])
    w = timestep_weight(t, 1000, 5.0)
    assert w[0] == 1.0
    assert math.isclose(float(w[-1]), math.exp(-5), rel_tol=1e-6)
    assert math.isclose(float(w[2]), math.exp(-2.5), rel_tol=1e-6)
    assert (w[1:] < w[:-1]).all()
    assert torch.allclose(timestep_weight(t, 1000, 0.0), torch.ones(4))  # k = 0: unweighted
    assert math.isclose(float(timestep_weight(torch.tensor([50]), 100, 2.0)), math.exp(-1.0), rel_tol=1e-6)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_inverts_the_exact_target(ptype):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 990])
    noisy = SCHED.add_noise(x0, noise, t)
    target = diffusion_target(noise, x0, t, SCHED.alphas_cumprod, ptype)
    assert torch.allclose(predict_x0(target, noisy, t, SCHED.alphas_cumprod, ptype), x0, atol=1e-3)


def test_v_target_matches_the_scheduler():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    assert torch.allclose(
        diffusion_target(noise, x0, t, SCHED.alphas_cumprod, "v_prediction"),
        SCHED.get_velocity(x0, noise, t),
        atol=1e-5,
    )


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(
            torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long), SCHED.alphas_cumprod, "flow"
        )
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(
            torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long), SCHED.alphas_cumprod, "x"
        )


def test_threshold_and_fraction_select_the_right_samples():
    enc = _face_encoder()
    assert IdentityLoss(enc, IdentityLossConfig(max_timestep=500)).select(
        torch.tensor([10, 600, 499, 900])
    ).tolist() == [0, 2]
    frac = IdentityLoss(enc, IdentityLossConfig(batch_fraction=0.5))
    picked = frac.select(torch.arange(8), torch.Generator().manual_seed(0))
    assert len(picked) == 4 and picked.tolist() == sorted(set(picked.tolist()))
    assert torch.equal(picked, frac.select(torch.arange(8), torch.Generator().manual_seed(0)))  # reproducible
    both = IdentityLoss(enc, IdentityLossConfig(max_timestep=100, batch_fraction=0.25))
    t = torch.tensor([5, 900, 50, 800, 999, 10, 700, 600])
    for seed in range(5):
        chosen = both.select(t, torch.Generator().manual_seed(seed))
        assert len(chosen) == 2 and set(chosen.tolist()) <= {0, 2, 5}  # 2 = ceil(0.25 x 8), all eligible
    assert len(IdentityLoss(enc, IdentityLossConfig(batch_fraction=0.1)).select(torch.arange(3))) == 1


def test_loss_is_lambda_times_batch_mean_of_weighted_identity_term():
    enc = _face_encoder()
    loss = IdentityLoss(enc, IdentityLossConfig(lambda_id=0.1, k=5.0, max_timestep=500))
    x = _pixels(3)
    t = torch.tensor([0, 100, 900])
    lms = LMS.expand(3, 5, 2)
    ref = enc(warp_to_template(_pixels(3, seed=1), lms))
    out = loss(x0_hat=x, decode=lambda z: z, timesteps=t, landmarks=lms, reference_embeds=ref)
    cos = (enc(warp_to_template(x, lms)) * ref).sum(-1)
    w = torch.exp(-5.0 * t[:2] / 1000)
    assert out.num_used == 2
    assert torch.allclose(out.loss, 0.1 * ((1 - cos[:2]) * w).sum() / 3, atol=1e-6)  # sample 3 counts 0
    assert torch.allclose(out.id_loss, (1 - cos[:2]).mean(), atol=1e-6)
    assert torch.allclose(out.id_cosine, cos[:2].mean(), atol=1e-6)
    assert torch.allclose(out.weight_mean, w.mean())
    same = loss(
        x0_hat=x,
        decode=lambda z: z,
        timesteps=torch.tensor([0, 0, 0]),
        landmarks=lms,
        reference_embeds=enc(warp_to_template(x, lms)),
    )
    assert same.loss.abs() < 1e-6 and torch.allclose(same.id_cosine, torch.tensor(1.0), atol=1e-5)


def test_no_sample_selected_gives_a_zero_loss_that_still_backpropagates():
    x = _pixels(2).requires_grad_()
    out = IdentityLoss(_face_encoder(), IdentityLossConfig(max_timestep=10))(
        x0_hat=x,
        decode=lambda z: z,
        timesteps=torch.tensor([500, 900]),
        landmarks=LMS.expand(2, 5, 2),
        reference_embeds=torch.randn(2, 512),
    )
    assert out.num_used == 0 and out.loss == 0 and math.isnan(float(out.id_loss))
    out.loss.backward()
    assert x.grad is not None


def _centred(size):
    """Landmarks of a face in the middle of a size x size image."""
    shift = torch.tensor([size / 2 - 32.0, size / 2 - 36.0])
    return LMS + shift


def test_face_window_covering_the_latent_equals_full_decode():
    enc = _face_encoder()
    x = _pixels(2)
    lms = torch.stack([LMS, LMS * 0.5])  # the second crop reaches past the top-left corner: clamped
    ref = F.normalize(torch.randn(2, 512), dim=-1)
    t = torch.tensor([10, 20])
    kw = {"x0_hat": x, "decode": lambda z: z, "timesteps": t, "landmarks": lms, "reference_embeds": ref}
    full = IdentityLoss(enc, IdentityLossConfig(latent_scale=1))(**kw)
    for win in (64, 100):
        out = IdentityLoss(enc, IdentityLossConfig(face_window=win, latent_scale=1))(**kw)
        assert torch.allclose(out.loss, full.loss, atol=1e-6)


@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("window", ["auto", "fixed"])
def test_a_face_window_holds_the_whole_crop_and_sees_the_same_aligned_face(scale, window):
    enc = _face_encoder()
    lat = 192 // scale  # latents per side; images have 192 pixels, the crop reads ~ 60 of them
    lms = _centred(lat * scale).expand(2, 5, 2)

    def decode(z):  # a "codec" with ``scale`` pixels per latent
        return F.interpolate(z, scale_factor=scale, mode="nearest")

    x = _pixels(2, lat)
    ref = F.normalize(torch.randn(2, 512), dim=-1)
    kw = {
        "x0_hat": x,
        "decode": decode,
        "timesteps": torch.tensor([10, 20]),
        "landmarks": lms,
        "reference_embeds": ref,
    }
    full = IdentityLoss(enc, IdentityLossConfig(latent_scale=scale))(**kw)
    loss = IdentityLoss(enc, IdentityLossConfig(face_window="auto", latent_scale=scale))
    bounds = loss.window_bounds(lms, (lat, lat))
    need = int((bounds[:, 2:] - bounds[:, :2]).max())
    side = need if window == "auto" else need + 3
    cfg = IdentityLossConfig(face_window="auto" if window == "auto" else side, latent_scale=scale)
    decoded = []
    win = IdentityLoss(enc, cfg)(**{**kw, "decode": lambda z: decoded.append(z.shape) or decode(z)})
    assert torch.allclose(win.id_cosine, full.id_cosine, atol=1e-5)  # the aligned crop lies inside the window
    assert decoded == [(2, 3, side, side)] and side < lat  # only the window is decoded
    with pytest.raises(ValueError, match="latent_scale"):
        IdentityLoss(enc, IdentityLossConfig(face_window=side, latent_scale=scale + 1))(**kw)


def test_a_window_that_cuts_the_arcface_crop_is_an_error():
    """SD1.5 at 512 px with crop_scale 0.8: the ArcFace crop reads ~410 px (51 latents), so the
    former 32-latent window cut ~60 % of it away."""
    from idforge.data_pipeline.align import template_for

    lms = torch.as_tensor(template_for(512, 0.8))[None]
    loss = IdentityLoss(_face_encoder(), IdentityLossConfig(face_window=32, latent_scale=8))
    bounds = loss.window_bounds(lms, (64, 64))[0]
    assert (bounds[2:] - bounds[:2]).tolist() == [54, 54]  # 51.2 latents + rounding + 1-latent margins
    with pytest.raises(ValueError, match=r"identity_loss.face_window: 32 latents cannot hold .* >= 54"):
        loss(
            x0_hat=torch.zeros(1, 4, 64, 64),
            decode=lambda z: F.interpolate(z[:, :3], scale_factor=8),
            timesteps=torch.tensor([1]),
            landmarks=lms,
            reference_embeds=torch.randn(1, 512),
        )


def test_reduced_resolution_decode_halves_the_decoded_size_and_keeps_the_face():
    enc = _face_encoder()
    lms = _centred(128).expand(2, 5, 2)
    x = F.interpolate(_pixels(2, 16), size=128, mode="bilinear")  # smooth: survives halving
    kw = {
        "x0_hat": x,
        "timesteps": torch.tensor([10, 20]),
        "landmarks": lms,
        "reference_embeds": F.normalize(torch.randn(2, 512), dim=-1),
    }
    shapes = []

    def decode(z):
        shapes.append(tuple(z.shape))
        return z

    full = IdentityLoss(enc, IdentityLossConfig(latent_scale=1))(**kw, decode=decode)
    half = IdentityLoss(enc, IdentityLossConfig(latent_scale=1, decode_scale=0.5))(**kw, decode=decode)
    assert shapes == [(2, 3, 128, 128), (2, 3, 64, 64)]
    assert torch.allclose(half.id_cosine, full.id_cosine, atol=0.02)
    assert not torch.allclose(half.id_cosine, full.id_cosine, atol=1e-6)


def _tiny_models():
    unet = tiny_unet(TINY, seed=0)
    vae = tiny_vae(TINY)  # continues the seeded stream
    adapter = DiffIDAdapter(arcface_dim=512, clip_dim=8, text_dim=16, cross_attention_dim=16)
    return unet, VaeCodec(vae, sample_posterior=False), _face_encoder(), adapter


@pytest.mark.parametrize("checkpoint_decoder,face_window", [(False, None), (True, "auto")])
def test_gradient_reaches_unet_and_adapter_but_not_vae_or_arcface(checkpoint_decoder, face_window):
    unet, codec, enc, adapter = _tiny_models()
    frozen = list(codec.parameters()) + list(enc.parameters())
    frozen_before = [p.detach().clone() for p in frozen]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    z0 = codec.encode(x)  # (2, 4, 8, 8): 2 pixels per latent
    noise = torch.randn(z0.shape, generator=g)
    t = torch.tensor([5, 50])
    noisy = SCHED.add_noise(z0, noise, t)
    cond = adapter(
        torch.randn(2, 512, generator=g), torch.randn(2, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    )
    pred = unet(noisy, t, encoder_hidden_states=cond.context).sample
    x0_hat = predict_x0(pred, noisy, t, SCHED.alphas_cumprod, "epsilon")
    cfg = IdentityLossConfig(
        lambda_id=1.0,
        checkpoint_decoder=checkpoint_decoder,
        face_window=face_window,
        latent_scale=codec.downsample,
    )
    out = IdentityLoss(enc, cfg)(
        x0_hat=x0_hat,
        decode=codec.decode,
        timesteps=t,
        landmarks=(LMS / 4).expand(2, 5, 2),
        reference_embeds=F.normalize(torch.randn(2, 512, generator=g), dim=-1),
    )
    assert out.num_used == 2 and out.loss > 0
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    opt = torch.optim.SGD(
        list(unet.parameters()) + list(adapter.parameters()) + frozen, lr=0.1, weight_decay=0.1
    )
    unet_before = next(unet.parameters()).detach().clone()
    opt.step()
    assert all(torch.equal(b, p) for b, p in zip(frozen_before, frozen))
    assert not torch.equal(unet_before, next(unet.parameters()))


def test_identity_loss_keeps_the_face_encoder_in_eval_mode():
    loss = IdentityLoss(_face_encoder())
    loss.train()
    assert loss.training and not loss.face_encoder.training
    assert not any(p.requires_grad for p in loss.face_encoder.parameters())


def test_config_validation_and_errors():
    with pytest.raises(ValueError, match="batch_fraction"):
        IdentityLossConfig(batch_fraction=0)
    with pytest.raises(ValueError, match="max_timestep"):
        IdentityLossConfig(max_timestep=2000)
    with pytest.raises(ValueError, match="latent_scale"):
        IdentityLossConfig(face_window=32, latent_scale=None)
    with pytest.raises(ValueError, match="face_window"):
        IdentityLossConfig(face_window="whole")
    with pytest.raises(ValueError, match="decode_scale"):
        IdentityLossConfig(decode_scale=2.0)


def test_samples_without_identity_input_get_no_identity_term():
    """Identity dropout (classifier-free guidance) zeroes a sample's identity input; asking that sample
    to match ArcFace(x_original) would teach the null branch the identity, so it is excluded."""
    enc = _face_encoder()
    loss = IdentityLoss(enc, IdentityLossConfig(max_timestep=500))
    t = torch.tensor([10, 20, 600, 30])
    assert loss.select(t, active=torch.tensor([True, False, True, True])).tolist() == [0, 3]
    x0 = _pixels(4).requires_grad_(True)
    lms = LMS.expand(4, 5, 2).clone()
    ref = F.normalize(torch.randn(4, 512), dim=-1)
    out = loss(
        x0_hat=x0,
        decode=lambda z: z,
        timesteps=t,
        landmarks=lms,
        reference_embeds=ref,
        active=torch.tensor([True, False, True, False]),
    )
    assert out.num_used == 1
    out.loss.backward()
    per_sample = x0.grad.abs().flatten(1).sum(1)
    assert per_sample[0] > 0 and per_sample[1:].eq(0).all()
    none = loss(
        x0_hat=x0,
        decode=lambda z: z,
        timesteps=t,
        landmarks=lms,
        reference_embeds=ref,
        active=torch.zeros(4, dtype=torch.bool),
    )
    assert none.num_used == 0 and none.loss.item() == 0.0
