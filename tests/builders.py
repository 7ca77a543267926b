"""Builders shared by the tests: the tiny zoo's spec and a generator with trained-looking weights."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_spec(zoo: Path):
    """The :class:`ZooSpec` of a folder written by ``build_tiny``."""
    from idforge.models.zoo import ZooSpec

    return ZooSpec(
        base=str(zoo),
        image_encoder=f"local-dir:{zoo / 'clip_image_encoder'}",
        face_encoder=str(zoo / "face_encoder"),
    )


def perturbed_generator(zoo: Path, adapter: dict | None = None, scale: float = 0.05):
    """An :class:`IdentityGenerator` (eval mode) whose trainable weights are moved off their
    initialisation (zero-initialised gates included), so the identity path changes the output."""
    from idforge.models.generator import GeneratorConfig, IdentityGenerator

    torch.manual_seed(0)
    kwargs = {} if adapter is None else {"adapter": adapter}
    gen = IdentityGenerator.from_config(GeneratorConfig(zoo=tiny_spec(zoo), **kwargs))
    with torch.no_grad():
        for p in gen.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return gen.eval()


def live_pipeline(model, resolution: int = 32):
    """An :class:`IdentityPipeline` around ``model``'s live modules, progress bar off."""
    from idforge.inference.export import pipeline_from_generator

    pipe = pipeline_from_generator(model, resolution)
    pipe.set_progress_bar_config(disable=True)
    return pipe
