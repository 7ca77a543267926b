"""The curation job on hostile input: every file counted once with a reason, every good image kept,
shards readable with plain webdataset and tar."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig
from idforge.data_pipeline.synthid import SynthID, SynthIDConfig
from PIL import Image


def _png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.fixture()
def hostile_folder(tmp_path, synthid_folder):
    root = tmp_path / "in"
    shutil.copytree(synthid_folder, root)
    records = [json.loads(x) for x in (root / "landmarks.jsonl").read_text().splitlines()]
    good = SynthID(SynthIDConfig(num_identities=1, images_per_identity=2, heldout_identities=0, seed=9))
    odd = root / "odd"
    odd.mkdir()
    s0, s1 = good.render(0, 0), good.render(0, 1)
    # good but unusual encodings, with provided landmarks
    arr16 = np.asarray(s0.image.convert("L")).astype(np.uint16) * 257
    (odd / "sixteen.png").write_bytes(_png(Image.fromarray(arr16)))
    s1.image.convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    for name, smp in (("odd/sixteen.png", s0), ("odd/cmyk.jpg", s1)):
        records.append(
            {
                "file": name,
                "landmarks": smp.landmarks.tolist(),
                "box": list(smp.box),
                "caption": smp.caption,
                "identity": "odd0",
                "split": "train",
            }
        )
    # broken inputs
    (odd / "zero.jpg").write_bytes(b"")
    jpg = io.BytesIO()
    s0.image.save(jpg, format="JPEG")
    (odd / "truncated.jpg").write_bytes(jpg.getvalue()[:300])
    (odd / "text.jpg").write_text("not an image at all")
    (odd / "bomb.png").write_bytes(_png(Image.new("1", (9000, 9000))))
    Image.new("RGB", (1, 1)).save(odd / "tiny.png")
    with tarfile.open(odd / "archive.tar", "w") as tar:
        for name, data in (("../evil.png", _png(s0.image)), ("inner/face.png", _png(s0.image))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "landmarks.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root, len(records)


def test_hostile_folder_counts_every_file_once(hostile_folder, tmp_path, tiny_face_encoder):
    root, n_good = hostile_folder
    cfg = CurateConfig(
        input=str(root),
        output=str(tmp_path / "out"),
        embedder=tiny_face_encoder,
        resolution=32,
        unit_size=7,
        filters=FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None),
    )
    m = run_curation(cfg)
    assert m["files_seen"] == n_good + 7  # 5 broken files + 2 tar members
    assert m["files_seen"] == m["images_accepted"] + sum(m["rejected"].values())
    assert m["images_accepted"] == n_good
    assert m["rejected"] == {
        "decode": 1,
        "decompression_bomb": 1,
        "empty": 1,
        "no_face": 1,
        "not_image": 1,
        "resolution": 1,
        "unsafe_path": 1,
    }
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "evil.png").exists()
    # every good image is in the shards: read back with plain webdataset
    import webdataset as wds

    sources = []
    for shard in m["shards"]:
        for sample in wds.WebDataset(str(tmp_path / "out" / shard), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["meta.json"])
            emb = np.load(io.BytesIO(sample["emb.npy"]))
            assert emb.dtype == np.float16 and emb.shape == (len(meta["images"]), 512)
            assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
            for i, rec in enumerate(meta["images"]):
                img = Image.open(io.BytesIO(sample[f"{i:03d}.jpg"]))
                assert img.size == (32, 32)
                assert np.array(rec["landmarks"]).shape == (5, 2)
                sources.append(rec["source"])
    assert "odd/sixteen.png" in sources and "odd/cmyk.jpg" in sources
    assert len(sources) == len(set(sources)) == n_good


def test_shards_are_plain_tar_files(synthid_folder, tmp_path):
    cfg = CurateConfig(
        input=str(synthid_folder),
        output=str(tmp_path / "o"),
        resolution=32,
        embedder=None,
        filters=FilterConfig(min_resolution=16, min_face_px=4),
    )
    m = run_curation(cfg)
    assert set(m["shards"]) == {"train-000000.tar", "heldout-000000.tar"}
    assert m["identities"] == {"train": 4, "heldout": 2}
    with tarfile.open(tmp_path / "o" / "train-000000.tar") as tar:
        names = tar.getnames()
    assert "id00000.meta.json" in names and "id00000.000.jpg" in names
    assert all(n.count(".") >= 1 and "/" not in n for n in names)


def test_groups_are_split_at_max_group_size(synthid_folder, tmp_path):
    cfg = CurateConfig(
        input=str(synthid_folder),
        output=str(tmp_path / "o"),
        resolution=32,
        max_group_size=3,
        embedder=None,
        filters=FilterConfig(min_resolution=16, min_face_px=4),
    )
    m = run_curation(cfg)
    assert m["groups"]["train"] == 8  # 4 identities x (3 + 1)
    import webdataset as wds

    keys = [
        s["__key__"] for s in wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False)
    ]
    assert "id00000-p000" in keys and "id00000-p001" in keys


def test_only_rank_zero_finalizes_once_every_unit_is_committed(synthid_folder, tmp_path):
    kw = {
        "input": str(synthid_folder),
        "output": str(tmp_path / "o"),
        "resolution": 32,
        "unit_size": 5,
        "embedder": None,
        "filters": FilterConfig(min_resolution=16, min_face_px=4),
    }
    assert run_curation(CurateConfig(rank=0, world_size=2, **kw)) is None  # rank 1's units pending
    assert run_curation(CurateConfig(rank=1, world_size=2, **kw)) is None  # not rank 0
    assert not (tmp_path / "o" / "manifest.json").exists()
    m = run_curation(CurateConfig(rank=0, world_size=2, **kw))
    assert m["images_accepted"] == 24


def test_rank_outside_world_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        CurateConfig(input=".", output=str(tmp_path), rank=2, world_size=2)
