"""The demo's VAE trainer: it learns to reconstruct, its scaling factor gives unit-variance latents,
and the trained VAE loads back through the zoo's codec like SD's."""

from __future__ import annotations

import pytest
import torch
from idforge.models import zoo
from idforge.train.vae import (
    VaeTrainConfig,
    _windows,
    fit_vae,
    latent_alignment,
    latent_scaling_factor,
    vae_loss,
)


def _images(n: int = 64, size: int = 16) -> torch.Tensor:
    """Smooth two-colour images: left/right halves of random colours, blurred edge."""
    g = torch.Generator().manual_seed(0)
    left, right = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(-3, 3, size).sigmoid().view(1, 1, 1, size)
    return ((left * (1 - ramp) + right * ramp).expand(n, 3, size, size) * 2 - 1).contiguous()


def _vae(seed: int = 0, channels=(8, 16, 16)):
    cfg = zoo.TinyConfig(resolution=16, vae_channels=channels, vae_attention=False, vae_norm_groups=2)
    return zoo.tiny_vae(cfg, seed=seed)


def test_training_reduces_the_reconstruction_error_and_is_deterministic():
    x = _images()
    cfg = VaeTrainConfig(steps=150, batch_size=8, lr=3e-3, crop=8)
    untrained = _vae(channels=(8, 16))
    with torch.no_grad():
        before = float((untrained.decode(untrained.encode(x).latent_dist.mode()).sample - x).abs().mean())
    vae = _vae(channels=(8, 16))
    losses = []
    fig = fit_vae(vae, x, cfg, progress=lambda step, loss: losses.append(loss))
    assert len(losses) == cfg.steps
    assert fig["recon_l1"] < 0.75 * before
    assert sum(losses[-10:]) < sum(losses[:10])
    again = _vae(channels=(8, 16))
    fit_vae(again, x, VaeTrainConfig(**{**cfg.__dict__, "steps": 5}))
    vae5 = _vae(channels=(8, 16))
    fit_vae(vae5, x, VaeTrainConfig(**{**cfg.__dict__, "steps": 5}))
    for (ka, va), (kb, vb) in zip(vae5.state_dict().items(), again.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_scaling_factor_makes_the_training_latents_unit_variance():
    vae, x = _vae(), _images()
    scale = latent_scaling_factor(vae, x, batch_size=16)
    assert vae.config.scaling_factor == pytest.approx(scale)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * scale
    assert float(z.std()) == pytest.approx(1.0, rel=1e-4)


def test_loss_is_l1_plus_weighted_l2_plus_weighted_kl_plus_weighted_alignment():
    vae, x = _vae(), _images(4)
    cfg = VaeTrainConfig(mse_weight=0.5, kl_weight=0.01, align_weight=0.3)
    loss, parts = vae_loss(vae, x, cfg, torch.Generator().manual_seed(3))
    expected = parts["l1"] + 0.5 * parts["l2"] + 0.01 * parts["kl"] + 0.3 * parts["align"]
    assert loss.item() == pytest.approx(expected, rel=1e-5) and parts["align"] > 0
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert parts["align"] == pytest.approx(float(latent_alignment(mean, x)), rel=1e-5)
    # the reconstruction is of a posterior sample drawn from the given generator
    again, _ = vae_loss(vae, x, cfg, torch.Generator().manual_seed(3))
    other, _ = vae_loss(vae, x, cfg, torch.Generator().manual_seed(4))
    assert again.item() == loss.item() and other.item() != loss.item()


def test_the_decoder_sees_the_posterior_sample_plus_noise_scaled_by_its_std():
    vae, x = _vae(), _images(4)
    cfg = VaeTrainConfig(kl_weight=0.0, align_weight=0.0, mse_weight=0.0, decoder_noise=0.5)
    loss, _ = vae_loss(vae, x, cfg, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(g)
        z = z + 0.5 * z.std() * torch.randn(z.shape, generator=g)
        expected = (vae.decode(z).sample - x).abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain_cfg = VaeTrainConfig(**{**cfg.__dict__, "decoder_noise": 0.0})
    plain, _ = vae_loss(vae, x, plain_cfg, torch.Generator().manual_seed(7))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
        expected = (vae.decode(z).sample - x).abs().mean()
    assert plain.item() == pytest.approx(expected.item(), rel=1e-5) and plain.item() != loss.item()


def test_alignment_is_the_squared_error_of_three_latent_channels_to_the_pooled_image():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    pooled = x.view(2, 3, 2, 4, 2, 4).mean((3, 5))  # 4 x 4 patches -> a 2 x 2 grid
    detail = torch.randn(2, 1, 2, 2)  # the fourth channel is free
    assert float(latent_alignment(torch.cat([pooled, detail], 1), x)) == pytest.approx(0.0, abs=1e-12)
    off = torch.cat([pooled + 0.5, detail], 1)
    assert float(latent_alignment(off, x)) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="at least 3 latent channels"):
        latent_alignment(torch.zeros(2, 2, 2, 2), x)


def test_aligned_training_makes_the_latents_a_small_image():
    x = _images()
    cfg = VaeTrainConfig(steps=150, batch_size=8, lr=3e-3, crop=8)
    free = _vae(channels=(8, 16))
    aligned = _vae(channels=(8, 16))
    off = fit_vae(free, x, VaeTrainConfig(**{**cfg.__dict__, "align_weight": 0.0}))
    on = fit_vae(aligned, x, cfg)
    assert on["align_l1"] < 0.2 * off["align_l1"]  # 0.21 against 1.57
    assert on["recon_l1"] < 1.1 * off["recon_l1"]  # and it reconstructs no worse (0.27 against 0.32)


def test_windows_are_crops_of_each_image():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    w = _windows(x, 8, torch.Generator().manual_seed(0))
    assert w.shape == (2, 3, 8, 8)
    for img, win in zip(x, w, strict=True):
        y0, x0 = divmod(int(win[0, 0, 0] - img[0, 0, 0]), 16)
        assert torch.equal(win, img[:, y0 : y0 + 8, x0 : x0 + 8])
    assert _windows(x, 0, torch.Generator()) is x


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling 4"):
        fit_vae(_vae(), _images(), VaeTrainConfig(steps=1, crop=6))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        fit_vae(_vae(), torch.zeros(4, 16, 16), VaeTrainConfig(steps=1))


def test_a_trained_vae_loads_back_through_the_zoo_codec(tmp_path):
    vae, x = _vae(), _images()
    fit_vae(vae, x, VaeTrainConfig(steps=2, batch_size=4, crop=8))
    vae.save_pretrained(tmp_path / "vae")
    codec = zoo.load_codec(zoo.ZooSpec(base=None, vae=str(tmp_path / "vae")))
    assert codec.scaling_factor == pytest.approx(vae.config.scaling_factor)
    with torch.no_grad():
        expected = vae.encode(x[:2]).latent_dist.mode() * vae.config.scaling_factor
    codec.sample_posterior = False
    assert torch.allclose(codec.encode(x[:2]), expected, atol=1e-6)
