"""Training-time reader of identity shards (webdataset), for single- and multi-GPU training.

Shards are split across DDP ranks (``webdataset.split_by_node``) and dataloader workers
(``split_by_worker``), reshuffled every pass with a seeded buffer, and repeated forever (training
is bounded by steps). Two sample modes:

- ``single`` (Diff-ID): one image with its caption, landmarks, box and ArcFace embedding; the
  reference is the same photo (``reference="same"``) or another photo of the person ("other").
- ``group`` (FlashFace): N in [min_refs, max_refs] reference photos (N random) + 1 target photo of
  the same identity; groups with fewer than N + 1 photos give as many references as they can.

Shards with cached encodings (:mod:`.cache`) also yield ``latent`` (C, h, w) and ``text_states``
(77, D) when they were cached at the requested resolution; the trainer then skips the VAE and
text encoder.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info


def _image_tensor(data: bytes, resolution: int) -> tuple[torch.Tensor, float]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 1.0
    if img.size != (resolution, resolution):
        scale = resolution / img.size[0]
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0, scale  # (3, H, W) in [-1, 1]


def decode_group(sample: dict, resolution: int) -> list[dict]:
    """One shard sample -> a list of per-image dicts of tensors."""
    meta = json.loads(sample["meta.json"])
    emb = np.load(io.BytesIO(sample["emb.npy"])) if "emb.npy" in sample else None
    cached = meta.get("cache", {}).get("resolution") == resolution and "lat.npy" in sample
    lat = np.load(io.BytesIO(sample["lat.npy"])) if cached else None
    txt = np.load(io.BytesIO(sample["txt.npy"])) if cached and "txt.npy" in sample else None
    out = []
    for i, rec in enumerate(meta["images"]):
        image, scale = _image_tensor(sample[f"{i:03d}.jpg"], resolution)
        item = {
            "image": image,
            "landmarks": torch.tensor(rec["landmarks"], dtype=torch.float32) * scale,
            "box": torch.tensor(rec["box"], dtype=torch.float32) * scale,
            "caption": rec.get("caption", ""),
            "identity": meta["identity"],
        }
        if emb is not None:
            item["embedding"] = torch.from_numpy(emb[i].astype(np.float32))
        if lat is not None:
            item["latent"] = torch.from_numpy(lat[i].astype(np.float32))
        if txt is not None:
            item["text_states"] = torch.from_numpy(txt[i].astype(np.float32))
        out.append(item)
    return out


class IdentityShardDataset(IterableDataset):
    def __init__(
        self,
        urls: list[str],
        mode: str = "single",
        resolution: int = 512,
        shuffle_buffer: int = 1000,
        min_refs: int = 1,
        max_refs: int = 4,
        reference: str = "same",
        seed: int = 0,
        repeat: bool = True,
    ):
        super().__init__()
        if mode not in ("single", "group"):
            raise ValueError(f"mode must be 'single' or 'group', got {mode!r}")
        if reference not in ("same", "other"):
            raise ValueError(f"reference must be 'same' or 'other', got {reference!r}")
        if not 1 <= min_refs <= max_refs:
            raise ValueError(f"need 1 <= min_refs <= max_refs, got {min_refs}, {max_refs}")
        if not urls:
            raise ValueError("no shards given")
        self.urls, self.mode, self.resolution = list(urls), mode, resolution
        self.shuffle_buffer, self.min_refs, self.max_refs = shuffle_buffer, min_refs, max_refs
        self.reference, self.seed, self.repeat = reference, seed, repeat

    def _groups(self, epoch: int) -> Iterator[list[dict]]:
        import webdataset as wds

        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
        )
        for sample in pipeline:
            yield decode_group(sample, self.resolution)

    def _items(self, group: list[dict], rng: random.Random) -> Iterator[dict]:
        if self.mode == "single":
            for i, item in enumerate(group):
                if self.reference == "other" and len(group) > 1:
                    j = rng.choice([k for k in range(len(group)) if k != i])
                    ref = group[j]
                    item = {**item, "reference": ref["image"], "reference_landmarks": ref["landmarks"]}
                    if "embedding" in ref:
                        item["reference_embedding"] = ref["embedding"]
                yield item
            return
        order = list(range(len(group)))
        rng.shuffle(order)
        target, rest = group[order[0]], [group[k] for k in order[1:]] or [group[order[0]]]
        n = min(rng.randint(self.min_refs, self.max_refs), len(rest))
        refs = rest[:n]
        item = {
            **target,
            "refs": torch.stack([r["image"] for r in refs]),
            "ref_landmarks": torch.stack([r["landmarks"] for r in refs]),
            "num_refs": n,
        }
        if all("embedding" in r for r in refs):
            item["ref_embeddings"] = torch.stack([r["embedding"] for r in refs])
        yield item

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid = info.id if info else 0
        epoch = 0
        while True:
            rng = random.Random(hash((self.seed, epoch, wid)) & 0xFFFFFFFF)
            buffer: list[dict] = []
            for group in self._groups(epoch):
                for item in self._items(group, rng):
                    if self.shuffle_buffer <= 1:
                        yield item
                        continue
                    buffer.append(item)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1
            if not self.repeat:
                return


def make_identity_dataset(
    urls: list[str],
    mode: str = "single",
    resolution: int = 512,
    shuffle_buffer: int = 1000,
    min_refs: int = 1,
    max_refs: int = 4,
    reference: str = "same",
    seed: int = 0,
    repeat: bool = True,
) -> IdentityShardDataset:
    return IdentityShardDataset(
        urls, mode, resolution, shuffle_buffer, min_refs, max_refs, reference, seed, repeat
    )


def collate_identity_samples(items: list[dict]) -> dict:
    """Stack tensors, keep strings as lists, and pad reference groups to the batch's largest N."""
    out: dict = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if key in ("refs", "ref_landmarks", "ref_embeddings"):
            n = max(v.shape[0] for v in vals)
            vals = [torch.cat([v, v.new_zeros((n - v.shape[0], *v.shape[1:]))]) for v in vals]
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif key == "num_refs":
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    if "num_refs" in out:
        n = out["refs"].shape[1]
        out["ref_mask"] = torch.arange(n)[None, :] < out["num_refs"][:, None]
    return out
