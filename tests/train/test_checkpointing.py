"""Atomic checkpoint writes, adapter-only safetensors and the 8-bit Adam extra's error."""

from __future__ import annotations

import sys

import pytest
import torch
from idforge.train.checkpointing import AtomicCheckpointIO
from safetensors.torch import load_file


def test_a_write_that_dies_midway_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"model.adapter.w": torch.ones(2)}}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"model.adapter.w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.safetensors"]
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the old one, whole


def test_adapter_safetensors_hold_exactly_the_trainable_weights(tiny_zoo, tmp_path):
    from tests.train.test_module_faults import _module

    module = _module(tiny_zoo)
    checkpoint = {"global_step": 3, "state_dict": module.state_dict(), "hyper_parameters": module.hparams}
    module.on_save_checkpoint(checkpoint)  # keeps the trainable tensors only
    ema = {k: v + 1 for k, v in module.model.trainable_state_dict().items()}
    checkpoint["ema"] = ema
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "step=3.ckpt")
    live = load_file(tmp_path / "step=3.safetensors")
    expected = module.model.trainable_state_dict()
    assert set(live) == set(expected)
    assert all(torch.equal(live[k], expected[k]) for k in expected)
    averaged = load_file(tmp_path / "step=3.ema.safetensors")
    assert set(averaged) == set(expected) and all(torch.equal(averaged[k], ema[k]) for k in ema)
    io.remove_checkpoint(tmp_path / "step=3.ckpt")  # retention removes the siblings too
    assert list(tmp_path.iterdir()) == []


def test_8bit_adam_without_bitsandbytes_names_the_extra(monkeypatch):
    from idforge.train.optimizers import AdamW8bit

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"idforge\[bnb\]"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
