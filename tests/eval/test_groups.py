"""Identity groups read back from shards: whole identities, in shard order, singletons dropped."""

from __future__ import annotations

import io

import numpy as np
import torch
from idforge.data_pipeline.shards import GroupImage, IdentityGroup, write_shards
from idforge.eval.groups import load_groups
from PIL import Image

LMS = [[10.0, 12.0], [22.0, 12.0], [16.0, 18.0], [11.0, 24.0], [21.0, 24.0]]  # in a 32 px crop


def _photo(value: int, caption: str) -> GroupImage:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")  # lossless
    return GroupImage(buf.getvalue(), {"caption": caption, "box": [4, 4, 28, 28], "landmarks": LMS})


def test_load_groups_joins_split_identities_and_drops_single_photos(tmp_path):
    groups = [
        IdentityGroup("ann-p000", "ann", [_photo(0, "ann 0"), _photo(40, "ann 1")]),
        IdentityGroup("bob", "bob", [_photo(80, "bob 0")]),  # one photo: no gallery, dropped
        IdentityGroup("ann-p001", "ann", [_photo(120, "ann 2")]),  # the rest of ann, in another shard
        IdentityGroup("cid", "cid", [_photo(160, "cid 0"), _photo(200, "cid 1")]),
    ]
    urls = [str(tmp_path / n) for n in write_shards(groups, tmp_path, "heldout", max_groups_per_shard=2)]
    assert len(urls) == 2

    got = load_groups(urls, resolution=16)
    assert [g.identity for g in got] == ["ann", "cid"]
    ann = got[0]
    assert ann.captions == ["ann 0", "ann 1", "ann 2"]
    assert ann.images.shape == (3, 3, 16, 16)
    assert torch.allclose(ann.images[:, 0, 0, 0], torch.tensor([0, 40, 120]) / 127.5 - 1)
    assert torch.allclose(ann.landmarks, torch.tensor(LMS).expand(3, 5, 2) / 2)  # 32 -> 16 px
    assert [g.identity for g in load_groups(urls, resolution=16, max_identities=1)] == ["ann"]
