"""Training-time reader of identity shards (webdataset), for single- and multi-GPU training.

The stream is a ``webdataset.DataPipeline`` built from webdataset's own stages:

- training (``repeat=True``): ``ResampledShards`` (every rank and worker draws shards at random with
  replacement, seeded per rank, worker and epoch), so a reader never runs dry and never waits on a
  reader that has no shard, however few shards there are; endless, or ``epoch_length`` items per
  reader per pass (``with_epoch``);
- validation (``repeat=False``): one finite pass in which every sample is read exactly once across
  all ranks x workers. Shards are split per rank (``split_by_node``) and per worker
  (``split_by_worker``) when there are at least as many shards as readers; with fewer, the same
  stages split the *samples* instead (every reader opens the shards and keeps every n-th sample), so
  no reader is left without data and nothing is read twice. With ``shuffle_buffer > 1`` the shard
  order is reshuffled every pass (same order on every reader, a new one each epoch).

Samples are exploded into per-item records and shuffled (``webdataset.shuffle``) while still raw
(JPEG bytes plus a few small arrays), then decoded: the shuffle buffer costs ~50 KB per item, not a
3 MB float tensor, and only the images an item uses are decoded. Two sample modes:

- ``single`` (Diff-ID): one image with its caption, landmarks, box and ArcFace embedding; the
  reference is the same photo (``reference="same"``) or another photo of the person ("other").
- ``group`` (FlashFace): N in [min_refs, max_refs] reference photos (N random) + 1 target photo of
  the same identity; groups with fewer than N + 1 photos give as many references as they can; only
  the N + 1 chosen photos are decoded.

Shards with cached encodings (:mod:`.cache`) also yield ``latent`` (C, h, w) and ``text_states``
(77, D) when they were cached at the requested resolution; the trainer then skips the VAE and
text encoder.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

log = logging.getLogger(__name__)
ARRAYS = {"emb.npy": "embedding", "lat.npy": "latent", "txt.npy": "text_states"}


def _seed(*parts) -> int:
    """A seed from ``parts`` that is the same in every process (``hash()`` of a str is not)."""
    return zlib.crc32(repr(parts).encode())


def _image_tensor(data: bytes, resolution: int) -> tuple[torch.Tensor, float]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 1.0
    if img.size != (resolution, resolution):
        scale = resolution / img.size[0]
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0, scale  # (3, H, W) in [-1, 1]


def _group_arrays(sample: dict, meta: dict, resolution: int) -> dict[str, np.ndarray]:
    """The sample's per-image arrays by item key; cached encodings only at the cached resolution."""
    cached = meta.get("cache", {}).get("resolution") == resolution
    return {
        name: np.load(io.BytesIO(sample[member]), allow_pickle=False)
        for member, name in ARRAYS.items()
        if member in sample and (member == "emb.npy" or cached)
    }


def _raw_image(sample: dict, meta: dict, arrays: dict, i: int) -> dict:
    """Photo ``i`` of a group, undecoded: JPEG bytes, its meta record and its rows of the arrays."""
    return {
        "jpg": sample[f"{i:03d}.jpg"],
        "rec": meta["images"][i],
        **{k: a[i].copy() for k, a in arrays.items()},
    }


def _decode_image(raw: dict, resolution: int, identity: str) -> dict:
    image, scale = _image_tensor(raw["jpg"], resolution)
    rec = raw["rec"]
    item = {
        "image": image,
        "landmarks": torch.tensor(rec["landmarks"], dtype=torch.float32) * scale,
        "box": torch.tensor(rec["box"], dtype=torch.float32) * scale,
        "caption": rec.get("caption", ""),
        "identity": identity,
    }
    for name in ARRAYS.values():
        if name in raw:
            item[name] = torch.from_numpy(raw[name].astype(np.float32))
    return item


def decode_group(sample: dict, resolution: int) -> list[dict]:
    """One shard sample -> a list of per-image dicts of tensors (every photo decoded)."""
    meta = json.loads(sample["meta.json"])
    arrays = _group_arrays(sample, meta, resolution)
    return [
        _decode_image(_raw_image(sample, meta, arrays, i), resolution, meta["identity"])
        for i in range(len(meta["images"]))
    ]


def raw_items(
    samples: Iterator[dict],
    mode: str,
    reference: str,
    min_refs: int,
    max_refs: int,
    resolution: int,
    rng_for: Callable[[str], random.Random],
) -> Iterator[dict]:
    """Pipeline stage: shard samples -> undecoded item records (one per photo, or one per group)."""
    for sample in samples:
        meta = json.loads(sample["meta.json"])
        arrays = _group_arrays(sample, meta, resolution)
        n, rng = len(meta["images"]), rng_for(sample["__key__"])
        base = {"identity": meta["identity"], "__key__": sample["__key__"]}
        if mode == "single":
            for i in range(n):
                rec = {**base, "target": _raw_image(sample, meta, arrays, i)}
                if reference == "other" and n > 1:
                    j = rng.choice([k for k in range(n) if k != i])
                    rec["reference"] = _raw_image(sample, meta, arrays, j)
                yield rec
            continue
        order = rng.sample(range(n), n)
        target, rest = order[0], order[1:] or order[:1]
        k = min(rng.randint(min_refs, max_refs), len(rest))
        yield {
            **base,
            "target": _raw_image(sample, meta, arrays, target),
            "refs": [_raw_image(sample, meta, arrays, j) for j in rest[:k]],
        }


def decode_item(rec: dict, resolution: int) -> dict:
    """Pipeline stage (map): an undecoded item record -> the dict of tensors the trainer reads."""
    identity = rec["identity"]
    item = _decode_image(rec["target"], resolution, identity)
    if "reference" in rec:
        ref = _decode_image(rec["reference"], resolution, identity)
        item["reference"], item["reference_landmarks"] = ref["image"], ref["landmarks"]
        if "embedding" in ref:
            item["reference_embedding"] = ref["embedding"]
    if "refs" in rec:
        refs = [_decode_image(r, resolution, identity) for r in rec["refs"]]
        item["refs"] = torch.stack([r["image"] for r in refs])  # (N, 3, H, W)
        item["ref_landmarks"] = torch.stack([r["landmarks"] for r in refs])  # (N, 5, 2)
        item["num_refs"] = len(refs)
        if all("embedding" in r for r in refs):
            item["ref_embeddings"] = torch.stack([r["embedding"] for r in refs])  # (N, 512)
    return item


def split_stages(n_shards: int, world: int, workers: int, rank: int) -> tuple[list, list]:
    """webdataset split stages (before, after reading the tars) that give each of ``world x workers``
    readers a disjoint share: whole shards where there are enough, else every n-th sample."""
    import webdataset as wds

    node_on_shards = n_shards >= world
    shards_here = len(range(rank, n_shards, world)) if node_on_shards else n_shards
    worker_on_shards = shards_here >= workers
    before = ([wds.split_by_node] if node_on_shards else []) + (
        [wds.split_by_worker] if worker_on_shards else []
    )
    after = ([] if node_on_shards else [wds.split_by_node]) + (
        [] if worker_on_shards else [wds.split_by_worker]
    )
    return before, after


class IdentityShardDataset(IterableDataset):
    """Identity samples from shards; see the module docstring for how the stream is built."""

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
        epoch_length: int | None = None,
    ):
        super().__init__()
        if mode not in ("single", "group"):
            raise ValueError(f"mode must be 'single' or 'group', got {mode!r}")
        if reference not in ("same", "other"):
            raise ValueError(f"reference must be 'same' or 'other', got {reference!r}")
        if not 1 <= min_refs <= max_refs:
            raise ValueError(f"need 1 <= min_refs <= max_refs, got {min_refs}, {max_refs}")
        if not urls:
            raise ValueError("no shards given: pass shard paths, a glob or a brace pattern that matches some")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be a positive number of items or None, got {epoch_length}")
        self.urls, self.mode, self.resolution = list(urls), mode, resolution
        self.shuffle_buffer, self.min_refs, self.max_refs = shuffle_buffer, min_refs, max_refs
        self.reference, self.seed, self.repeat, self.epoch_length = reference, seed, repeat, epoch_length
        self.epoch = 0  # passes started by this copy (each DataLoader worker keeps its own)
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at ``epoch`` (reshuffles shards and samples as for that epoch)."""
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int, batch_size: int) -> None:
        """Continue the stream where a run stopped: pass ``epoch``, after ``batches`` batches of
        ``batch_size`` were consumed. A DataLoader takes batches from its workers in turn, so worker w
        of W produced the batches w, w + W, ... of those; each skips its share of items, still raw
        (before JPEG decoding). The next pass of a copy starts as usual."""
        self.epoch = epoch
        self._resume = (batches, batch_size)

    def _skip_items(self) -> int:
        if self._resume is None:
            return 0
        import webdataset as wds

        batches, batch_size = self._resume
        self._resume = None
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        return len(range(worker, batches, max(1, workers))) * batch_size

    def pipeline(self, epoch: int, skip: int = 0):
        """The ``webdataset.DataPipeline`` of one pass, for the calling rank and worker, after ``skip``
        items (already consumed before a resume)."""
        import webdataset as wds

        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        stream_rng = random.Random(_seed(self.seed, epoch, rank, worker))
        if self.repeat:
            stages = [
                wds.ResampledShards(self.urls, seed=_seed(self.seed, epoch), deterministic=True),
                wds.tarfile_to_samples(),
            ]
            rng_for = lambda key: stream_rng
        else:
            before, after = split_stages(len(self.urls), world, workers, rank)
            if world * workers > len(self.urls):
                log.info(
                    "%d shards for %d readers (%d ranks x %d workers): splitting samples, not shards",
                    len(self.urls),
                    world * workers,
                    world,
                    workers,
                )
            stages = [wds.SimpleShardList(self.urls)]
            if self.shuffle_buffer > 1:  # same shard order on every reader, a new one each pass
                n = len(self.urls)
                stages.append(wds.shuffle(n, n, seed=_seed(self.seed, epoch)))
            stages += [*before, wds.tarfile_to_samples(), *after]
            salt = epoch if self.shuffle_buffer > 1 else 0  # unshuffled passes choose the same refs
            rng_for = lambda key: random.Random(_seed(self.seed, salt, key))
        stages.append(
            wds.pipelinefilter(raw_items)(
                self.mode, self.reference, self.min_refs, self.max_refs, self.resolution, rng_for
            )
        )
        if self.shuffle_buffer > 1:  # on raw items: JPEG bytes, not decoded tensors
            stages.append(
                wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=stream_rng.getrandbits(31))
            )
        if skip:
            stages.append(lambda src: itertools.islice(src, skip, None))
        stages.append(wds.map(lambda rec: decode_item(rec, self.resolution)))
        pipe = wds.DataPipeline(*stages)
        if self.repeat and self.epoch_length:
            return pipe.with_epoch(max(0, self.epoch_length - skip))
        return pipe

    def __iter__(self) -> Iterator[dict]:
        skip = self._skip_items()
        epoch, self.epoch = self.epoch, self.epoch + 1
        yield from self.pipeline(epoch, skip)


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
    epoch_length: int | None = None,
) -> IdentityShardDataset:
    """Training stream (``repeat=True``: resampled shards, endless or ``epoch_length`` items per reader)
    or one finite validation pass (``repeat=False``); see the module docstring."""
    return IdentityShardDataset(
        urls, mode, resolution, shuffle_buffer, min_refs, max_refs, reference, seed, repeat, epoch_length
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
