"""Cache VAE latents and CLIP text states in curated shards (SPEC.md sec. 4 stage 6, optional).

Training encodes every image with the frozen VAE and every caption with the frozen CLIP text
encoder at each step; both are fixed functions of the shard, so a separate GPU stage can compute
them once. :func:`cache_shards` reads each shard, adds per identity group

- ``lat.npy``: (k, C, h, w) float16, the VAE posterior mean, scaled as the generator's codec does
  (``VaeCodec.encode`` with ``sample_posterior=False``), at the stated resolution;
- ``txt.npy``: (k, 77, D) float16, the text encoder's last hidden states of each caption;

and records ``meta.json["cache"] = {"resolution", "latent_shape", "text_shape", "codec", "text_encoder"}``.
The reader (:mod:`.reader`) yields them as ``latent`` / ``text_states`` when the cache's
resolution matches the requested one, and the trainer then skips the encoders.

Resumable: each output shard is written to a temporary name and renamed when complete; a re-run
skips the shards that exist. The input shards are never modified (``out`` must differ from
``shards``); the manifest is copied with a ``cache`` entry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .shards import npy_bytes

log = logging.getLogger(__name__)


class _Encoders:
    """The frozen codec + text encoder of a zoo spec (loaded through the generator's loaders)."""

    def __init__(self, zoo, device: str, dtype: torch.dtype):
        from idforge.models import zoo as zoo_lib

        spec = zoo_lib.resolve(zoo_lib.ZooSpec(**zoo) if isinstance(zoo, dict) else zoo)
        self.codec = zoo_lib.load_codec(spec).to(device).eval()
        if hasattr(self.codec, "sample_posterior"):
            self.codec.sample_posterior = False
        self.text_encoder = zoo_lib.load_text_encoder(spec).to(device).eval()
        self.tokenizer = zoo_lib.load_tokenizer(spec)
        self.device, self.dtype = device, dtype
        self.names = {
            "codec": type(self.codec).__name__,
            "vae": str(spec.vae or spec.base),
            "text_encoder": str(spec.text_encoder or spec.base),
        }

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> np.ndarray:
        with torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.device != "cpu"):
            z = self.codec.encode(images.to(self.device))
        return z.float().cpu().numpy().astype(np.float16)

    @torch.no_grad()
    def text(self, captions: list[str]) -> np.ndarray:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].float().cpu().numpy().astype(np.float16)


def _cache_one(url: Path, dest: Path, enc: _Encoders, resolution: int, batch_size: int) -> int:
    import webdataset as wds

    from .reader import decode_group

    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    n = 0
    with wds.TarWriter(str(tmp)) as sink:
        for sample in wds.WebDataset(str(url), shardshuffle=False, empty_check=False):
            items = decode_group(sample, resolution)
            images = torch.stack([it["image"] for it in items])
            lat = np.concatenate(
                [enc.latents(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
            )
            txt = enc.text([it["caption"] for it in items])
            meta = json.loads(sample["meta.json"])
            meta["cache"] = {
                "resolution": resolution,
                "latent_shape": list(lat.shape[1:]),
                "text_shape": list(txt.shape[1:]),
                **enc.names,
            }
            out = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            out.update(
                {"meta.json": json.dumps(meta).encode(), "lat.npy": npy_bytes(lat), "txt.npy": npy_bytes(txt)}
            )
            sink.write(out)
            n += len(items)
    os.replace(tmp, dest)
    return n


def cache_shards(
    shards: str | Path,
    out: str | Path,
    zoo,
    resolution: int,
    device: str = "cpu",
    dtype: str = "float16",
    batch_size: int = 16,
    progress=None,
) -> dict:
    """Write copies of the shards in ``shards`` with cached latents and text states into ``out``."""
    src, dst = Path(shards).resolve(), Path(out).resolve()
    if src == dst:
        raise ValueError(f"cache output {dst} is the input folder: write the cached shards to a new folder")
    urls = sorted(src.glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"no .tar shards in {src}: run `idforge curate` first")
    dst.mkdir(parents=True, exist_ok=True)
    for stale in dst.glob(".*.tmp-*"):  # left by a killed run
        stale.unlink()
    enc = _Encoders(zoo, device, getattr(torch, dtype))
    done, images = [], 0
    for url in urls:
        dest = dst / url.name
        if dest.is_file():
            done.append(url.name)
            continue
        images += _cache_one(url, dest, enc, resolution, batch_size)
        if progress:
            progress(url.name)
    log.info("cached %d images in %d shards (%d already cached)", images, len(urls) - len(done), len(done))
    summary = {
        "shards": [u.name for u in urls],
        "skipped_existing": done,
        "images_encoded": images,
        "resolution": resolution,
        **enc.names,
    }
    if (src / "manifest.json").is_file():
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["cache"] = {
            k: v for k, v in summary.items() if k not in ("skipped_existing", "images_encoded")
        }
        (dst / "manifest.json.tmp").write_text(json.dumps(manifest, indent=1))
        os.replace(dst / "manifest.json.tmp", dst / "manifest.json")
    for extra in src.glob("cluster_report_*"):
        shutil.copy2(extra, dst / extra.name)
    return summary


__all__ = ["cache_shards"]
