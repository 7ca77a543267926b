"""`idforge export` on what DeepSpeed writes instead of a .ckpt file: a folder of shards."""

from __future__ import annotations

import importlib.util

import pytest
from idforge.launch.export_cmd import export_checkpoint


def test_a_plain_folder_is_named_as_not_a_checkpoint(tmp_path):
    with pytest.raises(IsADirectoryError, match="a folder, not a checkpoint file"):
        export_checkpoint(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_deepspeed_folder_without_deepspeed_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "last.ckpt" / "checkpoint").mkdir(parents=True)
    (tmp_path / "last.ckpt" / "latest").write_text("checkpoint")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"idforge\[deepspeed\]"):
        export_checkpoint(tmp_path / "last.ckpt", tmp_path / "out")


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt: checkpoint not found"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out")
