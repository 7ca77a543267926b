"""Train a small ``AutoencoderKL`` on aligned face crops: the latent space of the built-in demo.

A real run diffuses in SD1.5's pretrained VAE; the offline demo has no pretrained VAE, so it
trains a small one (three levels: 64 px faces <-> 4 x 16 x 16 latents) on its training photos and
then runs the same codec, pipeline and export as SD1.5. The objective is the first-stage
objective of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G) without its perceptual
and adversarial terms (no pretrained LPIPS network or discriminator offline): an L1 + L2 pixel
reconstruction of a posterior sample plus a KL regulariser with a small weight (1e-6, as the "KL-reg"
autoencoders). The autoencoder is fully convolutional (the mid-block attention is optional), so it
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
    """Reconstruction of a posterior sample (L1 + ``mse_weight`` L2) + ``kl_weight`` KL (per image)."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    l1 = (recon - x).abs().mean()
    l2 = (recon - x).pow(2).mean()
    kl = posterior.kl().mean()
    loss = l1 + cfg.mse_weight * l2 + cfg.kl_weight * kl
    return loss, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def fit_vae(
    vae,
    images: torch.Tensor,
    cfg: VaeTrainConfig | None = None,
    progress: Callable[[int, float], object] | None = None,
) -> dict:
    """Train ``vae`` in place on ``images`` (N, 3, H, W) in [-1, 1], then set its scaling factor.

    Returns {"loss": last-50-step mean, "scaling_factor", "recon_l1": L1 of the posterior mode's
    reconstruction on (up to) 256 training images}. ``progress(step, loss)`` after every step.
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
        recon = vae.decode(vae.encode(sample).latent_dist.mode()).sample
    return {
        "loss": sum(recent) / max(len(recent), 1),
        "scaling_factor": scale,
        "recon_l1": float((recon.clamp(-1, 1) - sample).abs().mean()),
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


__all__ = ["VaeTrainConfig", "fit_vae", "latent_scaling_factor", "vae_loss"]
