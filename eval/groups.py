"""Held-out identity groups read back from shards: the input of the identity benchmark.

``idforge eval`` (any shards) and the demo (its held-out split) both load whole identities this
way: every photo of a person at the generator's resolution with its landmarks and caption, one
:class:`IdentityGroup` per identity (groups split over several shard samples are joined again).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from idforge.data_pipeline.reader import make_identity_dataset


@dataclass
class IdentityGroup:
    """Photos of one person at the generator's resolution: images (K, 3, H, W) in [-1, 1]."""

    identity: str
    images: torch.Tensor
    landmarks: torch.Tensor  # (K, 5, 2) pixel coordinates
    captions: list[str]


def load_groups(urls: list[str], resolution: int, max_identities: int | None = None) -> list[IdentityGroup]:
    """Identity groups (>= 2 photos each) from shards, in shard order."""
    ds = make_identity_dataset(urls, mode="single", resolution=resolution, shuffle_buffer=0, repeat=False)
    photos: dict[str, list[dict]] = defaultdict(list)
    for item in ds:
        photos[item["identity"]].append(item)
    groups = [
        IdentityGroup(
            identity=k,
            images=torch.stack([p["image"] for p in v]),
            landmarks=torch.stack([p["landmarks"] for p in v]),
            captions=[p["caption"] for p in v],
        )
        for k, v in photos.items()
        if len(v) >= 2
    ]
    return groups[:max_identities] if max_identities else groups
