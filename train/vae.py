"""Train a small ``AutoencoderKL`` on aligned face crops: the latent space of the built-in demo.

A real run diffuses in SD1.5's pretrained VAE; the offline demo has no pretrained VAE, so it
trains a small one (three levels: 64 px faces <-> 4 x 16 x 16 latents) on its training photos and
then runs the same codec, pipeline and export as SD1.5. The objective is the first-stage
objective of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G) without its perceptual
and adversarial terms (no pretrained LPIPS network or discriminator offline): an L1 + L2 pixel
reconstruction of a posterior sample plus a KL regulariser with a small weight (1e-6, as the "KL-reg"
autoencoders). A third term makes the latent space image-like: the posterior mean's first three channels
regress onto the photo average-pooled to the latent resolution (``align_weight``), so each latent pixel
carries the colour of its patch and the fourth channel the detail. SD1.5's own latents are close to such
a map (a fixed 4 x 3 matrix turns them into a recognisable preview of the image); a small VAE trained
without the term finds an arbitrary basis instead, in which the diffusion model's squared error says
little about the picture (on SynthID its generator transferred identity at a third of the rate, and it
reconstructed worse: L1 0.101 against 0.069 with the term, BENCHMARKS.md). This is a regulariser of the
latent space in the sense of EQ-VAE (Kouzelis et al. 2025), which shows that smoother, image-like
latents make diffusion models train faster. The decoder is also trained on latents with added noise
(``decoder_noise`` x their standard deviation, beside the posterior's own): it then decodes the
diffusion model's imperfect latents, which lie off the encoder's manifold, into faces rather than
stripes, as cascaded diffusion augments the low-resolution input of each stage (Ho et al. 2021,
sec. 3.2). The autoencoder is fully convolutional (the mid-block attention is optional), so it
trains on random ``crop`` x ``crop`` windows of the photos, 4x cheaper than full 64 px images at
``crop=32``; it then encodes whole images.

After training, the latent scaling factor is set as latent diffusion sets it (sec. 4.3.2): 1 / the
standard deviation of the latents of the training photos, so the diffusion model sees unit-variance
latents (SD1.5's 0.18215 came out of the same measurement).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class VaeTrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    crop: int = 32
    """Side of the random training windows (pixels, a multiple of the VAE's downsampling; 0: whole images)."""
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    """Weight of the L2 term beside L1 (L2 pulls colours in quickly, L1 keeps edges)."""
    align_weight: float = 1.0
    """Weight of the latent alignment: squared error of the posterior mean's first three channels to
    the image average-pooled to the latent grid (0: off, an unconstrained latent basis)."""
    decoder_noise: float = 0.3
    """Gaussian noise added to the decoder's input latents, in units of their standard deviation in the
    batch (0: the posterior sample alone)."""
    seed: int = 0


def _windows(x: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``crop`` x ``crop`` window per image (B, C, H, W) -> (B, C, crop, crop)."""
    b, _, h, w = x.shape
    if not crop or crop >= min(h, w):
        return x
    ys = torch.randint(0, h - crop + 1, (b,), generator=generator)
    xs = torch.randint(0, w - crop + 1, (b,), generator=generator)
    return torch.stack([img[:, y : y + crop, x_ : x_ + crop] for img, y, x_ in zip(x, ys, xs, strict=True)])


def vae_loss(
    vae, x: torch.Tensor, cfg: VaeTrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict]:
    """Reconstruction of a posterior sample, plus ``decoder_noise``, (L1 + ``mse_weight`` L2) +
    ``kl_weight`` KL (per image) +
    ``align_weight`` x the latent alignment (:func:`latent_alignment`)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator)
    if cfg.decoder_noise:
        z = z + cfg.decoder_noise * z.detach().std() * torch.randn(z.shape, generator=generator)
    recon = vae.decode(z).sample
    l1 = (recon - x).abs().mean()
    l2 = (recon - x).pow(2).mean()
    kl = posterior.kl().mean()
    align = latent_alignment(posterior.mean, x)
    loss = l1 + cfg.mse_weight * l2 + cfg.kl_weight * kl + cfg.align_weight * align
    return loss, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item(), "align": align.item()}


def latent_alignment(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the latents' first three channels (B, >=3, h, w) to the images (B, 3, H, W)
    average-pooled to h x w (H / h pixels per latent)."""
    if mean.shape[1] < 3:
        raise ValueError(f"latent alignment needs at least 3 latent channels, got {mean.shape[1]}")
    down = x.shape[-1] // mean.shape[-1]
    return (mean[:, :3] - torch.nn.functional.avg_pool2d(x, down)).pow(2).mean()


def fit_vae(
    vae,
    images: torch.Tensor,
    cfg: VaeTrainConfig | None = None,
    progress: Callable[[int, float], object] | None = None,
) -> dict:
    """Train ``vae`` in place on ``images`` (N, 3, H, W) in [-1, 1], then set its scaling factor.

    Returns {"loss": last-50-step mean, "scaling_factor", "recon_l1": L1 of the posterior mode's
    reconstruction on (up to) 256 training images, "align_l1": L1 of their latents' first three
    channels to the pooled images}. ``progress(step, loss)`` after every step.
    Deterministic for a given seed on CPU.
    """
    cfg = cfg or VaeTrainConfig()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"fit_vae: images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.crop and cfg.crop % down:
        raise ValueError(f"fit_vae: crop {cfg.crop} is not a multiple of the VAE's downsampling {down}")
    g = torch.Generator().manual_seed(cfg.seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=0.1
    )
    recent: list[float] = []
    for step in range(cfg.steps):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=g)
        x = _windows(images[idx].float(), cfg.crop, g)
        loss, _ = vae_loss(vae, x, cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if progress is not None:
            progress(step, recent[-1])
    vae.eval().requires_grad_(False)
    sample = images[:256].float()
    scale = latent_scaling_factor(vae, images)
    with torch.no_grad():
        z = vae.encode(sample).latent_dist.mode()
        recon = vae.decode(z).sample
    pooled = torch.nn.functional.avg_pool2d(sample, sample.shape[-1] // z.shape[-1])
    return {
        "loss": sum(recent) / max(len(recent), 1),
        "scaling_factor": scale,
        "recon_l1": float((recon.clamp(-1, 1) - sample).abs().mean()),
        "align_l1": float((z[:, :3] - pooled).abs().mean()),
    }


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the posterior means of ``images`` (latent diffusion sec. 4.3.2), written into the
    VAE's config (``scaling_factor``) and returned."""
    zs = [
        vae.encode(images[i : i + batch_size].float()).latent_dist.mode()
        for i in range(0, len(images), batch_size)
    ]
    scale = 1.0 / float(torch.cat(zs).float().std())
    vae.register_to_config(scaling_factor=scale)
    return scale


__all__ = ["VaeTrainConfig", "fit_vae", "latent_alignment", "latent_scaling_factor", "vae_loss"]
