"""LightningDataModule over curated identity shards (webdataset), for single- and multi-GPU training.

The streams come from :func:`idforge.data_pipeline.reader.make_identity_dataset`. Training: every
rank and worker resamples shards at random (webdataset ``ResampledShards``), so no reader waits on
one without a shard, and shuffles undecoded items; the stream is endless (runs are bounded by
``trainer.max_steps``) unless ``epoch_length`` sets the items per reader per epoch. Validation: one
finite pass that reads every held-out sample exactly once across ranks x workers, splitting shards
where there are enough and samples where there are not. Workers persist across epochs.
"""

from __future__ import annotations

import glob
import logging

import lightning as L
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


def expand_urls(urls: str | list[str]) -> list[str]:
    """Accept a glob, a brace pattern ("shard-{000000..000009}.tar"), or a list of paths."""
    if isinstance(urls, (list, tuple)):
        return [str(u) for u in urls]
    if any(c in urls for c in "*?["):
        found = sorted(glob.glob(urls))
        if not found:
            raise FileNotFoundError(f"no shards match {urls!r}")
        return found
    import braceexpand

    return list(braceexpand.braceexpand(urls))


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 4,
        resolution: int = 512,
        mode: str = "single",
        reference: str = "same",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch_length: int | None = None,
    ):
        """
        Args:
            train_shards: training shards (glob, brace pattern or list).
            val_shards: validation shards (held-out identities), optional.
            batch_size: per-device batch size (Diff-ID: 16 in total over 4 GPUs x grad. accumulation).
            num_workers: dataloader worker processes per device.
            resolution: training resolution in pixels (SD1.5: 512).
            mode: "single" (Diff-ID: one image + its reference) or "group" (FlashFace: 1..4 refs + target).
            reference: "same" (the reference is the target photo) or "other" (another photo of the person).
            shuffle_buffer: samples held in the shuffle buffer.
            seed: shuffling seed.
            epoch_length: training items each reader (rank x worker) yields per epoch; None: endless.
        """
        super().__init__()
        if mode not in ("single", "group"):
            raise ValueError(f"mode must be 'single' or 'group', got {mode!r}")
        if reference not in ("same", "other"):
            raise ValueError(f"reference must be 'same' or 'other', got {reference!r}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resolution = resolution
        self.mode = mode
        self.reference = reference
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_length = epoch_length
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        """Data position for exact resume: the epoch and the training batches consumed in it."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict) or None

    def _loader(self, urls, train: bool) -> DataLoader:
        from idforge.data_pipeline.reader import collate_identity_samples, make_identity_dataset

        ds = make_identity_dataset(
            expand_urls(urls),
            mode=self.mode,
            resolution=self.resolution,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            reference=self.reference,
            seed=self.seed,
            repeat=train,
            epoch_length=self.epoch_length if train else None,
        )
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_identity_samples,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_shards, train=True)
        if self._resume is not None:  # continue the stream where the checkpoint left it
            r, self._resume = self._resume, None
            if r["batch_size"] != self.batch_size:
                log.warning(
                    "data.batch_size changed from %d to %d since the checkpoint; the stream restarts at "
                    "the saved epoch instead of continuing exactly",
                    r["batch_size"],
                    self.batch_size,
                )
                loader.dataset.set_epoch(r["epoch"])
            else:
                loader.dataset.resume_at(r["epoch"], r["batches"], r["batch_size"])
                log.info("data: resuming epoch %d after %d batches", r["epoch"], r["batches"])
        return loader

    def val_dataloader(self):
        if not self.val_shards:
            return []
        return self._loader(self.val_shards, train=False)
