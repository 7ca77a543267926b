"""Data plumbing of the demo: curate SynthID into shards, stream the train split, load its held-out split."""

from __future__ import annotations

from pathlib import Path

from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig
from idforge.data_pipeline.reader import collate_identity_samples, make_identity_dataset
from idforge.eval.groups import IdentityGroup, load_groups
from torch.utils.data import DataLoader


def curate_demo_shards(
    synthid_dir: Path,
    shards_dir: Path,
    face_encoder: str,
    resolution: int,
    crop_scale: float,
    progress=None,
) -> dict:
    cfg = CurateConfig(
        input=str(synthid_dir),
        output=str(shards_dir),
        detector="landmarks",
        embedder=face_encoder,
        resolution=resolution,
        crop_scale=crop_scale,
        unit_size=512,
        filters=FilterConfig(min_resolution=32, min_face_px=8),
    )
    manifest = run_curation(cfg, progress=progress)
    if manifest is None:  # single worker: every unit is ours
        raise RuntimeError(f"curation of {synthid_dir} did not finalize")
    return manifest


def shard_loader(
    shards_dir: Path,
    resolution: int,
    batch_size: int,
    seed: int,
    mode: str = "single",
    max_refs: int = 4,
    reference: str = "same",
) -> DataLoader:
    """The train split: single photos (adapter; the identity input from the photo itself or, with
    ``reference="other"``, from another photo of the person) or groups of 1..``max_refs`` references +
    a target (ReferenceNet, ``mode="group"``)."""
    urls = sorted(str(p) for p in Path(shards_dir).glob("train-*.tar"))
    ds = make_identity_dataset(
        urls,
        mode=mode,
        resolution=resolution,
        shuffle_buffer=512,
        seed=seed,
        max_refs=max_refs,
        reference=reference,
    )
    return DataLoader(ds, batch_size=batch_size, num_workers=0, collate_fn=collate_identity_samples)


def heldout_groups(shards_dir: Path, resolution: int) -> list[IdentityGroup]:
    urls = sorted(str(p) for p in Path(shards_dir).glob("heldout-*.tar"))
    return load_groups(urls, resolution)
