"""Training-time reader: single and group samples, references, collation, worker/rank splitting."""

from __future__ import annotations

import pytest
import torch
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig
from idforge.data_pipeline.reader import collate_identity_samples, make_identity_dataset
from torch.utils.data import DataLoader


@pytest.fixture(scope="module")
def shards(synthid_folder, tiny_face_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    run_curation(
        CurateConfig(
            input=str(synthid_folder),
            output=str(out),
            resolution=32,
            embedder=tiny_face_encoder,
            filters=FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None),
        )
    )
    return sorted(str(p) for p in out.glob("*.tar"))


def test_single_samples_cover_every_image_once_per_pass(shards):
    ds = make_identity_dataset(shards, mode="single", resolution=32, shuffle_buffer=0, repeat=False)
    items = list(ds)
    assert len(items) == 24
    it = items[0]
    assert it["image"].shape == (3, 32, 32) and -1 <= it["image"].min() and it["image"].max() <= 1
    assert it["landmarks"].shape == (5, 2) and it["embedding"].shape == (512,) and it["caption"]


def test_upsampled_reading_scales_landmarks(shards):
    a = next(iter(make_identity_dataset(shards, resolution=32, shuffle_buffer=0, repeat=False)))
    b = next(iter(make_identity_dataset(shards, resolution=64, shuffle_buffer=0, repeat=False)))
    assert torch.allclose(b["landmarks"], a["landmarks"] * 2)


def test_other_reference_is_another_photo_of_the_same_person(shards):
    ds = make_identity_dataset(shards, reference="other", resolution=32, shuffle_buffer=0, repeat=False)
    for it in list(ds)[:6]:
        assert not torch.equal(it["reference"], it["image"])
        assert "reference_embedding" in it and "reference_landmarks" in it


def test_group_mode_gives_one_to_four_references_and_pads_in_batches(shards):
    ds = make_identity_dataset(shards, mode="group", resolution=32, shuffle_buffer=0, repeat=False, seed=3)
    items = list(ds)
    assert len(items) == 6  # one per identity group
    assert all(1 <= it["num_refs"] <= 3 for it in items)  # 4 photos: at most 3 references + the target
    batch = collate_identity_samples(items[:4])
    n = batch["refs"].shape[1]
    assert batch["refs"].shape == (4, n, 3, 32, 32)
    assert (batch["ref_mask"].sum(1) == batch["num_refs"]).all()


def test_shuffling_is_seeded_and_the_stream_repeats(shards):
    ids = lambda seed: [
        it["identity"]
        for _, it in zip(range(30), make_identity_dataset(shards, resolution=32, shuffle_buffer=8, seed=seed))
    ]
    assert ids(0) == ids(0) and ids(0) != ids(1)
    assert len(ids(0)) == 30  # more than one pass


def test_dataloader_workers_split_the_shards(shards):
    ds = make_identity_dataset(shards, resolution=32, shuffle_buffer=0, repeat=False)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_identity_samples)
    seen = sum(len(b["caption"]) for b in loader)
    assert seen == 24  # two shards, one per worker, nothing read twice


def test_bad_arguments_are_explained(shards):
    with pytest.raises(ValueError, match="mode"):
        make_identity_dataset(shards, mode="pairs")
    with pytest.raises(ValueError, match="no shards"):
        make_identity_dataset([])


# ---- stream structure: splitting, finiteness, resampling (tiny shards written with shards.write_shards)


def _jpeg(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 255 - value, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def _tiny_shards(out, n_shards: int, groups_per_shard: int = 3, photos: int = 2) -> list[str]:
    """``n_shards`` shards of ``groups_per_shard`` identities x ``photos`` photos; captions name the photo."""
    import numpy as np
    from idforge.data_pipeline.shards import GroupImage, IdentityGroup, write_shards

    rng = np.random.default_rng(0)
    groups = []
    for g in range(n_shards * groups_per_shard):
        images = [
            GroupImage(
                jpeg=_jpeg(10 * g + p),
                meta={"caption": f"g{g:02d}-{p}", "box": [2, 2, 14, 14], "landmarks": [[5, 6]] * 5},
                embedding=rng.normal(size=512).astype(np.float32),
            )
            for p in range(photos)
        ]
        groups.append(IdentityGroup(key=f"g{g:02d}", identity=f"g{g:02d}", images=images))
    names = write_shards(groups, out, "val", max_groups_per_shard=groups_per_shard)
    return [str(out / n) for n in names]


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    return _tiny_shards(tmp_path_factory.mktemp("one"), 1)


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    return _tiny_shards(tmp_path_factory.mktemp("four"), 4)


def _captions(ds, num_workers=0, batch_size=2) -> list[str]:
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_identity_samples,
        timeout=30 if num_workers else 0,  # a hung worker fails the test instead of blocking it
    )
    return [c for batch in loader for c in batch["caption"]]


def _all_photos(n_shards: int) -> list[str]:
    return sorted(f"g{g:02d}-{p}" for g in range(3 * n_shards) for p in range(2))


def test_more_workers_than_shards_finish_a_validation_epoch_reading_each_sample_once(one_shard):
    ds = make_identity_dataset(one_shard, resolution=16, shuffle_buffer=0, repeat=False)
    for _ in range(2):  # and the next epoch too
        assert sorted(_captions(ds, num_workers=2)) == _all_photos(1)


@pytest.mark.parametrize("num_workers", [0, 3])
def test_validation_stream_is_finite_and_yields_each_sample_once(four_shards, num_workers):
    ds = make_identity_dataset(four_shards, resolution=16, shuffle_buffer=0, repeat=False)
    assert sorted(_captions(ds, num_workers=num_workers)) == _all_photos(4)


@pytest.mark.parametrize("n_shards,workers", [(4, 2), (1, 1), (1, 2), (3, 2)])
def test_ranks_get_disjoint_validation_samples_that_cover_the_set(tmp_path, monkeypatch, n_shards, workers):
    """2 simulated DDP ranks (webdataset reads RANK/WORLD_SIZE): shards split when there are enough for
    every reader, samples split when there are not; nothing read twice, nothing missed."""
    urls = _tiny_shards(tmp_path, n_shards)
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = make_identity_dataset(urls, resolution=16, shuffle_buffer=0, repeat=False)
        per_rank.append(_captions(ds, num_workers=workers))
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == _all_photos(n_shards)


def test_train_stream_with_fewer_shards_than_readers_does_not_hang(one_shard, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # rank 1 of 4 with 2 workers: 8 readers, 1 shard
    monkeypatch.setenv("WORLD_SIZE", "4")
    ds = make_identity_dataset(one_shard, resolution=16, shuffle_buffer=4, epoch_length=10)
    captions = _captions(ds, num_workers=2)
    assert len(captions) == 20  # with_epoch: 10 items per worker, then the epoch ends
    assert set(captions) <= set(_all_photos(1))


def test_training_shards_are_drawn_in_a_new_order_each_epoch(four_shards):
    ds = make_identity_dataset(four_shards, resolution=16, shuffle_buffer=0, epoch_length=24, seed=5)
    shard_of = lambda caption: int(caption[1:3]) // 3
    epochs = [[shard_of(c) for c in _captions(ds)] for _ in range(3)]
    assert len(epochs[0]) == 24 and epochs[0] != epochs[1] != epochs[2]
    again = make_identity_dataset(four_shards, resolution=16, shuffle_buffer=0, epoch_length=24, seed=5)
    assert [shard_of(c) for c in _captions(again)] == epochs[0]  # seeded


def test_a_shuffled_finite_pass_is_complete_and_reordered_every_epoch(four_shards, one_shard):
    ds = make_identity_dataset(four_shards, resolution=16, shuffle_buffer=4, repeat=False, seed=1)
    first, second = _captions(ds), _captions(ds)
    assert sorted(first) == sorted(second) == _all_photos(4) and first != second
    # within one shard too: the items themselves are shuffled, not only the shard order
    plain = _captions(make_identity_dataset(one_shard, resolution=16, shuffle_buffer=0, repeat=False))
    mixed = _captions(make_identity_dataset(one_shard, resolution=16, shuffle_buffer=6, repeat=False))
    assert plain == _all_photos(1) and sorted(mixed) == plain and mixed != plain


def test_shuffle_buffer_holds_undecoded_items_and_group_mode_decodes_only_chosen_photos(
    tmp_path, monkeypatch
):
    from idforge.data_pipeline import reader

    decoded = []
    real = reader._image_tensor
    monkeypatch.setattr(reader, "_image_tensor", lambda data, res: decoded.append(1) or real(data, res))
    urls = _tiny_shards(tmp_path, 1, groups_per_shard=6, photos=6)
    stream = iter(make_identity_dataset(urls, resolution=16, shuffle_buffer=20, seed=0))
    next(stream)
    assert len(decoded) == 1  # 20 items buffered, 1 decoded
    decoded.clear()
    ds = make_identity_dataset(urls, mode="group", resolution=16, shuffle_buffer=0, repeat=False, max_refs=2)
    items = list(ds)
    assert len(items) == 6 and len(decoded) == sum(it["num_refs"] + 1 for it in items) <= 18  # of 36 photos
