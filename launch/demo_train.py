"""The demo's generator stage: the identity-conditioned module built from the tiny zoo and trained with
Lightning on the curated shards (``idforge demo`` and ``benchmarks/demo_generator.py`` share it)."""

from __future__ import annotations

from pathlib import Path

import torch


def zoo_config(cfg):
    """The tiny zoo's sizes for the demo's generator (``DemoConfig`` fields)."""
    from idforge.models.zoo import TinyConfig

    return TinyConfig(
        resolution=cfg.resolution,
        vae_channels=tuple(cfg.vae_channels),
        vae_attention=False,
        vae_norm_groups=cfg.vae_norm_groups,
        seed=cfg.seed,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=cfg.prediction_type,
        **cfg.tiny,
    )


def train_generator(cfg, zoo, shards_dir: Path, out: Path, progress_bar: bool = True):
    """Build the demo's generator module from ``zoo`` and train it on ``shards_dir``'s train split;
    returns (module, trainer). With ``cfg.ema_decay`` the module holds the averaged weights after."""
    import lightning as L
    from idforge.models.generator import GeneratorConfig
    from idforge.models.losses import IdentityLossConfig
    from idforge.train.ema import EMA
    from idforge.train.module import IdentityDiffusionModule
    from idforge.train.optim import LRSchedule

    from .demo_data import shard_loader

    id_loss = IdentityLossConfig(lambda_id=cfg.identity_loss) if cfg.identity_loss > 0 else None
    uses_reference = cfg.generator != "adapter"
    module = IdentityDiffusionModule(
        GeneratorConfig(
            zoo=zoo,
            adapter=dict(cfg.adapter) if cfg.generator != "referencenet" else {},
            train_unet=True,
            conditioning=cfg.generator,
            reference={**cfg.reference, "image_size": cfg.resolution} if uses_reference else None,
        ),
        identity_loss=id_loss,
        optimizer=lambda p: torch.optim.Adam(p, lr=cfg.lr),
        lr_schedule=LRSchedule(warmup_steps=cfg.warmup_steps, decay=cfg.lr_decay),
        id_drop_prob=cfg.id_drop_prob,
        text_drop_prob=cfg.text_drop_prob,
    )
    ema = EMA(decay=cfg.ema_decay, device=None) if cfg.ema_decay > 0 else None
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=str(out),
        callbacks=[ema] if ema is not None else [],
    )
    loader = shard_loader(
        shards_dir,
        cfg.resolution,
        cfg.batch_size,
        cfg.seed,
        mode="group" if uses_reference else "single",
        max_refs=cfg.max_refs,
        reference=cfg.reference_photo,
    )
    trainer.fit(module, train_dataloaders=loader)
    if ema is not None:
        ema.apply_to(module)
    return module, trainer


__all__ = ["train_generator", "zoo_config"]
