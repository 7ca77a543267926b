"""ShardDataModule: the training loader survives more readers than shards, validation is one finite
pass reading every held-out photo once, and bad options are refused."""

from __future__ import annotations

import pytest
from idforge.train.data import ShardDataModule

from tests.data_pipeline.test_reader import _all_photos, _tiny_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm")
    _tiny_shards(out, 1)
    return out


def _module(shard_dir, **kw):
    glob = str(shard_dir / "val-*.tar")
    return ShardDataModule(
        train_shards=glob, val_shards=glob, batch_size=2, num_workers=2, resolution=16, **kw
    )


def test_train_loader_with_more_workers_than_shards_yields_and_ends_its_epochs(shard_dir):
    loader = _module(shard_dir, epoch_length=5, shuffle_buffer=4).train_dataloader()
    loader.timeout = 30  # a hung worker fails the test instead of blocking it
    assert loader.persistent_workers
    for _ in range(2):
        captions = [c for batch in loader for c in batch["caption"]]
        assert len(captions) == 10 and set(captions) <= set(_all_photos(1))  # 2 workers x 5 items


def test_val_loader_is_one_finite_pass_over_every_photo(shard_dir):
    loader = _module(shard_dir).val_dataloader()
    loader.timeout = 30
    for _ in range(2):
        assert sorted(c for batch in loader for c in batch["caption"]) == _all_photos(1)


def test_no_val_shards_means_no_validation_and_bad_modes_are_refused(shard_dir):
    assert ShardDataModule(train_shards=str(shard_dir / "val-*.tar")).val_dataloader() == []
    with pytest.raises(ValueError, match="mode"):
        _module(shard_dir, mode="pairs")
    with pytest.raises(ValueError, match="reference"):
        _module(shard_dir, reference="random")


def test_shard_urls_expand_from_globs_braces_and_lists(tmp_path):
    from idforge.train.data import expand_urls

    for name in ("s-000002.tar", "s-000000.tar", "s-000001.tar", "other.tar"):
        (tmp_path / name).write_bytes(b"")
    expected = [str(tmp_path / f"s-00000{i}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "s-*.tar")) == expected  # sorted, other files left out
    assert expand_urls(str(tmp_path / "s-00000[0-2].tar")) == expected
    assert expand_urls(str(tmp_path / "s-{000000..000002}.tar")) == expected
    assert expand_urls(str(tmp_path / "{s-000001,other}.tar")) == [
        str(tmp_path / n) for n in ("s-000001.tar", "other.tar")
    ]
    assert expand_urls([tmp_path / "b.tar", "a.tar"]) == [
        str(tmp_path / "b.tar"),
        "a.tar",
    ]  # lists kept as given
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_urls(str(tmp_path / "missing-*.tar"))


def test_datamodule_reads_the_same_photos_through_a_brace_pattern_as_through_a_glob(shard_dir):
    import glob

    names = sorted(glob.glob(str(shard_dir / "val-*.tar")))
    first, last = names[0][-10:-4], names[-1][-10:-4]
    brace = str(shard_dir / f"val-{{{first}..{last}}}.tar")

    def captions(urls):
        dm = ShardDataModule(train_shards=urls, val_shards=urls, batch_size=2, num_workers=0, resolution=16)
        dm.setup("fit")
        return sorted(c for batch in dm.val_dataloader() for c in batch["caption"])

    assert captions(brace) == captions(str(shard_dir / "val-*.tar")) == _all_photos(1)
