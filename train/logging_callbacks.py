"""Training-time logging callbacks: throughput and memory, sample grids, and a per-rank debug record.

- :class:`TrainMonitor` logs ``train/images_per_s`` (all ranks together: per-rank rate x world size),
  ``train/step_time_s`` and, on CUDA, ``train/gpu_mem_alloc_gib`` / ``train/gpu_mem_reserved_gib``
  (peaks since the previous log). Learning rates come from Lightning's ``LearningRateMonitor`` and the
  per-term losses (``train/denoise``, ``train/identity``, ...) from the module itself.
- :class:`SampleGridCallback` generates, every ``every_n_steps`` and at the end of training, one
  image per fixed held-out identity (the first ``num_identities`` identities of the validation shards,
  read in order) with :class:`~idforge.inference.pipeline.IdentityPipeline` (the export's sampler, around
  the live modules), and writes a grid of rows
  ``reference | generated`` as ``<log_dir>/samples/step_NNNNNNN.png`` and to the logger (wandb's
  ``log_image``, TensorBoard's ``add_image``; other loggers get the PNG only). Rank 0 only.
- :class:`RankSampleRecorder` writes, per rank, the sample keys, an image checksum and a checksum of
  the module's noise stream at every step (``rank<R>.jsonl``): the evidence that DDP ranks read
  different samples and draw different noise (tests/train/test_ddp.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


def _batch_size(batch) -> int:
    return int(batch["image"].shape[0]) if isinstance(batch, dict) and "image" in batch else 0


class TrainMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int | None = None):
        """
        Args:
            log_every_n_steps: log interval in optimiser steps (None: the trainer's log_every_n_steps).
        """
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"TrainMonitor.log_every_n_steps: must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self._t0: float | None = None
        self._images = 0
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += _batch_size(batch)
        self._batches += 1
        every = self.log_every_n_steps or max(1, trainer.log_every_n_steps)
        if self._batches < every or self._t0 is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        world = max(1, trainer.world_size)
        metrics = {
            "train/images_per_s": self._images / dt * world,
            "train/step_time_s": dt / self._batches,
        }
        if pl_module.device.type == "cuda":
            metrics["train/gpu_mem_alloc_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["train/gpu_mem_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._t0, self._images, self._batches = time.perf_counter(), 0, 0


def held_out_references(shards, resolution: int, num_identities: int) -> list[dict]:
    """The first image of each of the first ``num_identities`` identities in ``shards`` (in order)."""
    from idforge.data_pipeline.reader import make_identity_dataset
    from idforge.train.data import expand_urls

    ds = make_identity_dataset(
        expand_urls(shards), mode="single", resolution=resolution, shuffle_buffer=0, repeat=False
    )
    seen, out = set(), []
    for item in ds:
        if item["identity"] in seen:
            continue
        seen.add(item["identity"])
        out.append(item)
        if len(out) == num_identities:
            break
    return out


def grid_image(references: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """(3, N*H, 2*W) uint8 grid, one row per identity: reference | generated (inputs in [-1, 1])."""
    rows = torch.cat([references, generated], dim=-1)  # (N, 3, H, 2W)
    grid = torch.cat(list(rows), dim=-2)  # (3, N*H, 2W)
    return ((grid.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class SampleGridCallback(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 1000,
        num_identities: int = 4,
        shards: str | list[str] | None = None,
        steps: int = 30,
        guidance_scale: float = 1.0,
        seed: int = 0,
        dirpath: str | None = None,
    ):
        """
        Args:
            every_n_steps: generate every this many optimiser steps (and once when training ends).
            num_identities: held-out identities shown (one row each).
            shards: shards to take them from (None: the datamodule's ``val_shards``).
            steps: DDIM steps per sample.
            guidance_scale: classifier-free guidance scale (1: none).
            seed: seed of the fixed initial latents (the same at every step, so grids are comparable).
            dirpath: where PNGs go (None: ``<trainer.log_dir or default_root_dir>/samples``).
        """
        super().__init__()
        if every_n_steps < 1 or num_identities < 1:
            raise ValueError(
                f"SampleGridCallback: every_n_steps and num_identities must be >= 1, got "
                f"{every_n_steps}, {num_identities}"
            )
        self.every_n_steps, self.num_identities, self.shards = every_n_steps, num_identities, shards
        self.steps, self.guidance_scale, self.seed, self.dirpath = steps, guidance_scale, seed, dirpath
        self._refs: list[dict] | None = None
        self._last_step = -1
        self.written: list[Path] = []

    def _references(self, trainer) -> list[dict]:
        if self._refs is None:
            dm = getattr(trainer, "datamodule", None)
            shards = self.shards or getattr(dm, "val_shards", None)
            if not shards:
                raise ValueError(
                    "SampleGridCallback: no held-out shards; set data.val_shards or the callback's shards"
                )
            resolution = int(getattr(dm, "resolution", 512))
            self._refs = held_out_references(shards, resolution, self.num_identities)
        return self._refs

    def _out_dir(self, trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    @torch.no_grad()
    def generate(self, trainer, pl_module) -> torch.Tensor:
        """The grid (3, N*H, 2*W) uint8 for the current weights, sampled by an :class:`IdentityPipeline`
        around the live modules (``pipeline_from_generator``: shared, not copied)."""
        from idforge.inference.export import pipeline_from_generator
        from idforge.inference.pipeline import IdentityEmbeds

        refs = self._references(trainer)
        model = pl_module.model
        images = torch.stack([r["image"] for r in refs]).to(pl_module.device)
        landmarks = torch.stack([r["landmarks"] for r in refs]).to(pl_module.device)
        embeds = torch.stack([r["embedding"] for r in refs]) if all("embedding" in r for r in refs) else None
        was_training = model.training
        model.eval()
        try:
            e_arc, e_clip = model.identity_embeds(
                images, landmarks, embeds.to(pl_module.device) if embeds is not None else None
            )
            pipe = pipeline_from_generator(model, images.shape[-1])
            pipe.set_progress_bar_config(disable=True)
            out = pipe(
                [r["caption"] for r in refs],
                identity=IdentityEmbeds(e_arc, e_clip),
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(self.seed),
                output_type="pt",
            ).images
        finally:
            model.train(was_training)
        return grid_image(images.cpu(), out.float().cpu() * 2 - 1)

    def _write(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if trainer.global_rank != 0:
            return
        grid = self.generate(trainer, pl_module)
        from PIL import Image

        out = self._out_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_{step:07d}.png"
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        self.written.append(path)
        log.info("sample grid written to %s", path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="samples/grid", images=[str(path)], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("samples/grid", grid, global_step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


def _checksum(t: torch.Tensor) -> float:
    return round(float(t.detach().double().cpu().reshape(-1).mul(torch.arange(1, t.numel() + 1)).sum()), 6)


class RankSampleRecorder(L.Callback):
    def __init__(self, dirpath: str):
        """
        Args:
            dirpath: folder for ``rank<R>.jsonl`` (one line per step: step, keys, image and noise checksums).
        """
        super().__init__()
        self.dirpath = Path(dirpath)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rng = getattr(pl_module, "_rng", None)
        if rng is None:
            pl_module.on_train_start()
            rng = pl_module._rng
        probe = torch.Generator(device=rng.device)
        probe.set_state(rng.get_state())  # the next draws of the module's noise stream, left untouched
        noise = torch.randn(64, generator=probe, device=rng.device)
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "step": trainer.global_step,
            "keys": [str(k) for k in batch.get("__key__", batch.get("identity", []))],
            "image": _checksum(batch["image"]),
            "noise": _checksum(noise),
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
