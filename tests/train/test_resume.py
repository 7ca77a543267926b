"""Checkpoints and exact resume through ``idforge train fit`` (subprocesses on CPU, tiny config):
kill -9 then ``--ckpt_path last`` repeats the uninterrupted loss sequence bit for bit; SIGTERM saves
a checkpoint and exits 0; writes are atomic; the adapter-only safetensors hold the trainable set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.data_pipeline.test_reader import _tiny_shards

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "train" / "tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _tiny_shards(tmp_path_factory.mktemp("resume_shards"), 2, groups_per_shard=3, photos=2)


def _fit(run_dir: Path, zoo: Path, shards: list[str], losses: Path, extra_callbacks=(), args=()):
    callbacks = [
        {"class_path": "tests.train.resume_helpers.LossRecorder", "init_args": {"path": str(losses)}},
        *extra_callbacks,
    ]
    cmd = [
        sys.executable, "-c", "import sys; from idforge.launch.cli import main; sys.exit(main())",
        "train", "fit", "--config", str(CONFIG),
        "--model.generator.zoo.base", str(zoo),
        "--model.generator.zoo.image_encoder", f"local-dir:{zoo / 'clip_image_encoder'}",
        "--model.generator.zoo.face_encoder", str(zoo / "face_encoder"),
        "--model.identity_loss", "null",
        "--trainer.max_steps", "6",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.callbacks+", json.dumps(callbacks),
        "--data.train_shards", json.dumps(shards),
        "--data.resolution", "16",
        "--data.batch_size", "2",
        "--data.shuffle_buffer", "4",
        *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def _read(losses: Path) -> list[tuple[int, str]]:
    return [tuple(line.split()) for line in losses.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_losses(tiny_zoo, shards, tmp_path_factory):
    """The uninterrupted run's (step, loss) lines."""
    folder = tmp_path_factory.mktemp("reference")
    done = _fit(folder / "run", tiny_zoo, shards, folder / "losses.txt")
    assert done.returncode == 0, done.stderr[-3000:]
    return _read(folder / "losses.txt")


@pytest.mark.slow
def test_kill_9_then_resume_from_last_repeats_the_uninterrupted_losses_bitwise(
    tiny_zoo, shards, reference_losses, tmp_path
):
    expected = reference_losses
    assert [int(s) for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert len({loss for _, loss in expected}) == 6  # distinct losses: the comparison means something

    run, losses = tmp_path / "run", tmp_path / "run.txt"
    kill = {"class_path": "tests.train.resume_helpers.SignalAtStep", "init_args": {"step": 4}}
    killed = _fit(run, tiny_zoo, shards, losses, [kill])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [int(s) for s, _ in _read(losses)] == [1, 2, 3, 4]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and not any(".tmp" in n for n in ckpts), ckpts

    resumed = _fit(run, tiny_zoo, shards, losses, args=["--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _read(losses) == expected  # steps 5 and 6 after the resume: the same bits


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_zoo, shards, reference_losses, tmp_path):
    run, losses = tmp_path / "run", tmp_path / "losses.txt"
    term = {
        "class_path": "tests.train.resume_helpers.SignalAtStep",
        "init_args": {"step": 3, "signum": int(signal.SIGTERM)},
    }
    out = _fit(run, tiny_zoo, shards, losses, [term])
    assert out.returncode == 0, out.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # the step under way when the signal came was finished, then saved
    assert [int(s) for s, _ in _read(losses)] == [1, 2, 3, 4]
    assert _read(losses) == reference_losses[:4]
    safetensors = last.with_suffix(".safetensors")
    assert safetensors.is_file() and last.with_suffix(".ema.safetensors").is_file()
