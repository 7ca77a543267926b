"""``idforge cache``: copies of curated shards with cached VAE latents and CLIP text states."""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def cache(
    shards: Path,
    out: Path,
    resolution: int,
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    device: str = "cpu",
    dtype: Literal["float16", "bfloat16", "float32"] = "float16",
    batch_size: int = 16,
) -> int:
    """Add cached VAE latents and CLIP text states to curated shards (training then skips the encoders).

    Args:
        shards: folder of shards written by `idforge curate`.
        out: output folder for the cached copies (resumable: finished shards are skipped).
        resolution: training resolution the latents are for.
        base: diffusers folder or hub name holding vae/, text_encoder/, tokenizer/ (or tiny:/folder).
        device: where the encoders run (cpu, cuda, cuda:1).
        dtype: precision of the encoders.
        batch_size: images encoded at once.
    """
    from idforge.data_pipeline.cache import cache_shards
    from tqdm import tqdm

    if not shards.is_dir():
        raise FileNotFoundError(f"--shards {shards}: no such folder (write it with `idforge curate`)")
    n = len(list(shards.glob("*.tar")))
    with tqdm(total=n, unit="shard", desc="cache") as bar:
        summary = cache_shards(
            shards,
            out,
            {"base": base},
            resolution,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            progress=lambda name: bar.update(1),
        )
    print(
        f"{summary['images_encoded']} images encoded into {len(summary['shards'])} shards in {out} "
        f"({len(summary['skipped_existing'])} already cached); train with --data.train_shards pointing there"
    )
    return 0
