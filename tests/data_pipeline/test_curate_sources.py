"""Curation inputs and parallelism: person folders name the identity, idforge shards are re-curated,
a process pool writes the same shards as one process, and the rank comes from the launcher's variables."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import webdataset as wds
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig

LOOSE = FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None)


def _cfg(src, out, **kw) -> CurateConfig:
    kw = {"resolution": 32, "unit_size": 5, "embedder": None, "filters": LOOSE, **kw}
    return CurateConfig(input=str(src), output=str(out), **kw)


def _groups(out: Path) -> dict[str, list[str]]:
    """identity -> sorted source keys of its images, over every shard of a curation output."""
    groups: dict[str, list[str]] = defaultdict(list)
    for shard in sorted(out.glob("*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            meta = json.loads(s["meta.json"])
            groups[meta["identity"]] += [im["source"] for im in meta["images"]]
    return {k: sorted(v) for k, v in groups.items()}


@pytest.fixture
def person_folders(synthid_folder, tmp_path):
    """SynthID photos re-filed under person folders alice/ (id00000 + one photo of id00001) and bob/,
    with the landmarks kept and the identity labels removed."""
    root = tmp_path / "people"
    records = [json.loads(x) for x in (synthid_folder / "landmarks.jsonl").read_text().splitlines()]
    records = [r for r in records if r["identity"] in ("id00000", "id00001")]
    lines = []
    for r in records:
        name = Path(r["file"]).name
        person = "alice" if r["identity"] == "id00000" or name.endswith("_0000.png") else "bob"
        (root / person).mkdir(parents=True, exist_ok=True)
        shutil.copy(synthid_folder / r["file"], root / person / name)
        lines.append(
            json.dumps(
                {k: v for k, v in r.items() if k not in ("identity", "split")} | {"file": f"{person}/{name}"}
            )
        )
    (root / "landmarks.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_person_folders_name_the_identities(person_folders, tmp_path):
    m = run_curation(_cfg(person_folders, tmp_path / "o", person_folders=True))
    groups = _groups(tmp_path / "o")
    assert sorted(groups) == ["alice", "bob"]
    assert groups["alice"] == sorted(
        [f"alice/id00000_000{i}.png" for i in range(4)] + ["alice/id00001_0000.png"]
    )
    assert groups["bob"] == [f"bob/id00001_000{i}.png" for i in (1, 2, 3)]
    assert m["images_accepted"] == 8
    # without the option the folders are just folders: every photo is its own identity
    run_curation(_cfg(person_folders, tmp_path / "flat"))
    assert len(_groups(tmp_path / "flat")) == 8


def test_curated_shards_can_be_curated_again(synthid_folder, tmp_path):
    first = run_curation(_cfg(synthid_folder, tmp_path / "a"))
    again = run_curation(_cfg(tmp_path / "a", tmp_path / "b", resolution=16))
    assert again["files_seen"] == first["images_accepted"] == again["images_accepted"]
    before, after = _groups(tmp_path / "a"), _groups(tmp_path / "b")
    assert sorted(before) == sorted(after)  # identities read back from the shards' metadata
    assert {k: len(v) for k, v in before.items()} == {k: len(v) for k, v in after.items()}
    assert all(key.split("::")[0].endswith(".tar") for v in after.values() for key in v)


def test_two_worker_processes_write_the_same_shards_as_one(synthid_folder, tmp_path):
    one = run_curation(_cfg(synthid_folder, tmp_path / "one"))
    two = run_curation(_cfg(synthid_folder, tmp_path / "two", workers=2))
    assert one["shards"] == two["shards"]
    for name in one["shards"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_rank_and_world_come_from_rank_before_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")

    def rank_world(**kw):
        cfg = _cfg(".", tmp_path, **kw)
        return cfg.rank, cfg.world_size

    assert rank_world() == (1, 3)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_world() == (0, 1)  # torchrun's RANK without WORLD_SIZE: one process
    monkeypatch.delenv("RANK")
    assert rank_world() == (3, 8)  # then the SLURM array
    assert rank_world(rank=2, world_size=4) == (2, 4)  # explicit values win
