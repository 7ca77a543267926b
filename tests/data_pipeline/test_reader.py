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
