"""Identity-grouped webdataset shards and their manifest (ARCHITECTURE.md, "Shards").

One webdataset sample per identity group, key = identity id (groups over ``max_group_size`` are
split into ``<key>-p000``, ``-p001``...; keys hold only letters, digits, ``_`` and ``-``: see
:func:`group_key`). Members:

- ``NNN.jpg``: the training crops (aligned and resized to the training resolution);
- ``meta.json``: ``{"identity", "centre": [512 floats], "images": [{caption, box, landmarks (in the
  stored image's pixels), score, quality, source, attributes}, ...]}``;
- ``emb.npy``: (k, 512) float16 L2-normalised ArcFace embeddings (when an embedder ran);
- ``lat.npy``: optional cached latents (k, C, h, w) float16.

Shards are plain tar files: ``tar tf`` lists them and ``webdataset.WebDataset`` reads them without
idforge. Each shard is written to a temporary name and renamed, so a reader never sees half a shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class GroupImage:
    jpeg: bytes
    meta: dict
    embedding: np.ndarray | None = None
    latent: np.ndarray | None = None


@dataclass
class IdentityGroup:
    key: str
    identity: str
    images: list[GroupImage] = field(default_factory=list)


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as the bytes of a ``.npy`` file (no pickles), the encoding of every array in a shard."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def group_sample(group: IdentityGroup) -> dict:
    """The webdataset sample dict of one identity group."""
    sample = {"__key__": group.key}
    embs = [im.embedding for im in group.images]
    meta = {"identity": group.identity, "images": [im.meta for im in group.images]}
    if all(e is not None for e in embs) and embs:
        emb = np.stack(embs).astype(np.float32)
        centre = emb.mean(0)
        centre /= np.linalg.norm(centre) + 1e-12
        meta["centre"] = [round(float(v), 5) for v in centre]
        sample["emb.npy"] = npy_bytes(emb.astype(np.float16))
    lats = [im.latent for im in group.images]
    if all(v is not None for v in lats) and lats:
        sample["lat.npy"] = npy_bytes(np.stack(lats).astype(np.float16))
    for i, im in enumerate(group.images):
        sample[f"{i:03d}.jpg"] = im.jpeg
    sample["meta.json"] = json.dumps(meta).encode()
    return sample


def write_shards(
    groups: list[IdentityGroup], out_dir: Path, prefix: str, max_groups_per_shard: int = 1000
) -> list[str]:
    """Write groups into ``<prefix>-NNNNNN.tar`` shards (atomically each); returns the file names."""
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for n, start in enumerate(range(0, len(groups), max_groups_per_shard)):
        name = f"{prefix}-{n:06d}.tar"
        tmp = out_dir / f".{name}.tmp"
        with wds.TarWriter(str(tmp)) as sink:
            for g in groups[start : start + max_groups_per_shard]:
                sink.write(group_sample(g))
        os.replace(tmp, out_dir / name)
        names.append(name)
    return names


def group_key(identity: str) -> str:
    """A webdataset key for an identity: letters, digits, ``_`` and ``-`` only; a name that had to be
    changed gets a short hash of the original, so ``a/0001.jpg`` and ``a_0001.jpg`` stay apart."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", identity)
    if safe != identity:
        safe += "-" + hashlib.sha1(identity.encode()).hexdigest()[:8]
    return safe


def split_group(identity: str, images: list[GroupImage], max_group_size: int) -> list[IdentityGroup]:
    safe = group_key(identity)
    if len(images) <= max_group_size:
        return [IdentityGroup(key=safe, identity=identity, images=images)]
    return [
        IdentityGroup(key=f"{safe}-p{p:03d}", identity=identity, images=images[s : s + max_group_size])
        for p, s in enumerate(range(0, len(images), max_group_size))
    ]


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """``manifest.json``, written to a host+pid-unique temporary name, fsynced and renamed."""
    tmp = out_dir / f".manifest.json.tmp-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / "manifest.json")
    return out_dir / "manifest.json"
