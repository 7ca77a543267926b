"""2-process DDP on CPU (gloo) through launch/torchrun_train.sh: the ranks read different samples and
draw different noise (per-rank seeds), and both take the same number of steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_shards(tiny_zoo, tmp_path_factory):
    """SynthID (4 training identities x 3 photos) curated at 32 px into 2 shards."""
    from idforge.data_pipeline.curate import CurateConfig, run_curation
    from idforge.data_pipeline.filters import FilterConfig
    from idforge.data_pipeline.synthid import SynthIDConfig, write_synthid_folder

    root = tmp_path_factory.mktemp("ddp_data")
    folder = write_synthid_folder(
        SynthIDConfig(num_identities=5, images_per_identity=3, resolution=64, heldout_identities=1, seed=4),
        root / "synthid",
    )
    run_curation(
        CurateConfig(
            input=str(folder),
            output=str(root / "shards"),
            detector="landmarks",
            embedder=str(tiny_zoo / "face_encoder"),
            resolution=32,
            groups_per_shard=2,
            filters=FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None),
        )
    )
    return root / "shards"


def test_two_process_ddp_ranks_see_different_samples_and_noise(tiny_zoo, train_shards, tmp_path):
    train = sorted(str(p) for p in train_shards.glob("train-*.tar"))
    assert train
    record = tmp_path / "ranks"
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))
        },
        "PYTHON": sys.executable,
        "MASTER_PORT": "29631",
        "OMP_NUM_THREADS": "1",
    }
    callbacks = [
        {
            "class_path": "idforge.train.logging_callbacks.RankSampleRecorder",
            "init_args": {"dirpath": str(record)},
        }
    ]
    run = subprocess.run(
        [
            "bash", str(ROOT / "launch" / "torchrun_train.sh"), str(ROOT / "configs" / "train" / "tiny.yaml"), "2", "--",
            "--model.generator.zoo.base", str(tiny_zoo),
            "--model.generator.zoo.image_encoder", f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
            "--model.generator.zoo.face_encoder", str(tiny_zoo / "face_encoder"),
            "--trainer.accelerator", "cpu",
            "--trainer.strategy", "ddp",
            "--trainer.max_steps", "3",
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.callbacks", json.dumps(callbacks),
            "--data.train_shards", json.dumps(train),
            "--data.batch_size", "2",
            "--data.num_workers", "0",
        ],
        env=env, capture_output=True, text=True, check=False, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    ranks = {
        r: [json.loads(line) for line in (record / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    }
    assert [x["step"] for x in ranks[0]] == [x["step"] for x in ranks[1]] == [0, 1, 2]
    assert all(x["world"] == 2 for r in ranks.values() for x in r)
    # different samples: the two ranks' batches differ at every step (images and their order)
    assert all(a["image"] != b["image"] for a, b in zip(ranks[0], ranks[1]))
    assert [a["keys"] for a in ranks[0]] != [b["keys"] for b in ranks[1]]
    # different noise: every step's noise stream differs between ranks, and it moves on within a rank
    assert all(a["noise"] != b["noise"] for a, b in zip(ranks[0], ranks[1]))
    assert len({x["noise"] for x in ranks[0]}) == 3
