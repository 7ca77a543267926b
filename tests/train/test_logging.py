"""Logging callbacks: the sample grid's layout and the throughput monitor's figures."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from idforge.train.logging_callbacks import TrainMonitor, grid_image


def test_grid_rows_are_reference_then_generated_per_identity():
    refs = torch.full((2, 3, 4, 4), -1.0)
    refs[1] = 1.0
    gen = torch.zeros(2, 3, 4, 4)
    grid = grid_image(refs, gen)
    assert grid.shape == (3, 8, 8) and grid.dtype == torch.uint8
    assert (grid[:, :4, :4] == 0).all() and (grid[:, 4:, :4] == 255).all()  # references on the left
    assert (grid[:, :, 4:] == 128).all()  # generated on the right


def test_train_monitor_logs_images_per_second_over_all_ranks():
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda m, **kw: logged.update(m))
    trainer = SimpleNamespace(world_size=4, log_every_n_steps=2)
    mon = TrainMonitor()
    batch = {"image": torch.zeros(8, 3, 2, 2)}
    mon.on_train_batch_start(trainer, module, batch, 0)
    mon.on_train_batch_end(trainer, module, None, batch, 0)
    assert not logged  # logs every trainer.log_every_n_steps
    mon._t0 -= 1.0  # pretend the two steps took 1 s more
    mon.on_train_batch_end(trainer, module, None, batch, 1)
    assert 0.9 * 64 / 1.0 < logged["train/images_per_s"] <= 64.0  # 16 images x 4 ranks in ~1 s
    assert 0.45 < logged["train/step_time_s"] < 0.6
