"""Identity morphing, Diff-ID sec. 3.4 (appendix A.1.5), on :class:`IdentityPipeline`.

Both photos are DDIM-inverted (Song et al. 2021, eta = 0) to z_T with their own identity and the
prompt; frame a in [0, 1] samples deterministically (DDIM, eta = 0) from

    z_mix = (1 - a) z1 + a z2                                   (LERP of the inverted latents)
    e_mix = sin((1 - a) w)/sin w e1 + sin(a w)/sin w e2          (SLERP, w = arccos(e1.e2/|e1||e2|))

Strategies (the paper's ablation): ``full`` (both), ``embedding`` (SLERP of the identity only,
z_T of the first photo throughout), ``latent`` (LERP of z_T only, the first photo's identity
throughout). Inversion runs the stock ``StableDiffusionPipeline`` loop with diffusers'
``DDIMInverseScheduler`` swapped in, so no sampling loop is written here.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .pipeline import IdentityEmbeds, IdentityPipeline, mix_identities

STRATEGIES = ("full", "embedding", "latent")


@contextmanager
def _scheduler(pipe: IdentityPipeline, scheduler):
    old = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = old


@torch.no_grad()
def ddim_invert(
    pipe: IdentityPipeline, latents: torch.Tensor, identity: IdentityEmbeds, prompt: str, steps: int = 50
) -> torch.Tensor:
    """z_0 (B, C, h, w) -> z_T by DDIM inversion under the given conditioning (no guidance)."""
    from diffusers import DDIMInverseScheduler

    config = pipe.scheduler.config
    # The first inverse step starts at alpha_bar = 1 (set_alpha_to_one) where an x0-predicting
    # model's noise estimate (z - sqrt(a) x0) / sqrt(1 - a) is 0/0 (NaN); starting at alpha_bar_0
    # makes that step the identity instead (the same alpha on both sides), which it is in the limit.
    extra = {"set_alpha_to_one": False} if config.prediction_type == "sample" else {}
    inverse = DDIMInverseScheduler.from_config(config, **extra)
    with _scheduler(pipe, inverse):
        return pipe(
            [prompt] * latents.shape[0],
            identity=identity,
            latents=latents,
            num_inference_steps=steps,
            output_type="latent",
        ).images


@torch.no_grad()
def ddim_sample(
    pipe: IdentityPipeline, latents: torch.Tensor, identity: IdentityEmbeds, prompt: str, steps: int = 50
) -> torch.Tensor:
    """z_T -> z_0 with deterministic DDIM (eta = 0) under the given conditioning (no guidance)."""
    from diffusers import DDIMScheduler

    with _scheduler(pipe, DDIMScheduler.from_config(pipe.scheduler.config)):
        return pipe(
            [prompt] * latents.shape[0],
            identity=identity,
            latents=latents,
            num_inference_steps=steps,
            output_type="latent",
        ).images


@torch.no_grad()
def morph(
    pipe: IdentityPipeline,
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    frames: int = 8,
    strategy: str = "full",
    prompt: str = "a photo of a face",
    steps: int = 50,
) -> torch.Tensor:
    """Frames (frames, 3, H, W) in [-1, 1] from aligned crops ``image_a`` / ``image_b`` (1, 3, H, W)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown morph strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (the two endpoints), got {frames}")
    id_a, id_b = pipe.encode_identity(image_a), pipe.encode_identity(image_b)
    z_a = ddim_invert(pipe, pipe.encode_images(image_a), id_a, prompt, steps)
    z_b = ddim_invert(pipe, pipe.encode_images(image_b), id_b, prompt, steps)
    out = []
    for i in range(frames):
        a = i / (frames - 1)
        z = (1 - a) * z_a + a * z_b if strategy in ("full", "latent") else z_a
        ident = mix_identities(id_a, id_b, a) if strategy in ("full", "embedding") else id_a
        out.append(pipe.decode_latents_to_images(ddim_sample(pipe, z, ident, prompt, steps)))
    return torch.cat(out)
