"""Sampling from the identity-conditioned generator (DDIM, Song et al. 2021; optional CFG).

The adapter replaces the UNet's context (Diff-ID sec. 3.2), so diffusers' stock
``StableDiffusionPipeline`` cannot feed it; this loop does the same steps with
``DDIMScheduler`` (deterministic, eta = 0 by default) and the generator's conditioning.
Classifier-free guidance (Ho & Salimans 2022) contrasts the full conditioning with the null one
(zeroed identity + empty prompt): eps = eps_null + s (eps_cond - eps_null).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from idforge.models.generator import IdentityGenerator


@dataclass
class SamplingConfig:
    steps: int = 50
    guidance_scale: float = 1.0
    eta: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")


@torch.no_grad()
def sample(
    model: IdentityGenerator,
    captions: list[str],
    arcface_embeds: torch.Tensor,
    clip_embeds: torch.Tensor,
    resolution: int,
    config: SamplingConfig | None = None,
    latents: torch.Tensor | None = None,
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Generate images (B, 3, H, W) in [-1, 1] for the given identity embeddings and captions.

    ``latents`` (B, C, h, w) starts the sampler from a given z_T (used by morphing); otherwise
    z_T is drawn with ``config.seed``; the same seeded generator draws DDIM's noise when ``eta > 0``.
    ``progress(1)`` is called after every denoising step (a ``tqdm.update``).
    """
    from diffusers import DDIMScheduler

    cfg = config or SamplingConfig()
    device = model.device
    b = len(captions)
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(cfg.steps, device=device)
    size = resolution // model.codec.downsample
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)  # z_T, then DDIM's eta noise
    if latents is None:
        latents = torch.randn((b, model.codec.latent_channels, size, size), generator=g).to(device)
    latents = latents * sched.init_noise_sigma
    text = model.encode_text(captions)
    cond = model.condition(arcface_embeds.to(device), clip_embeds.to(device), text)
    use_cfg = cfg.guidance_scale != 1.0
    if use_cfg:
        null = model.condition(
            torch.zeros_like(arcface_embeds).to(device),
            torch.zeros_like(clip_embeds).to(device),
            model.encode_text([""] * b),
        )
    for t in sched.timesteps:
        x_in = sched.scale_model_input(latents, t)
        tt = t.expand(b) if t.dim() == 0 else t
        pred = model.predict(x_in, tt, cond)
        if use_cfg:
            pred_null = model.predict(x_in, tt, null)
            pred = pred_null + cfg.guidance_scale * (pred - pred_null)
        latents = sched.step(pred, t, latents, eta=cfg.eta, generator=g).prev_sample
        if progress is not None:
            progress(1)
    return model.codec.decode(latents).clamp(-1, 1)
