"""DeepSpeed bookkeeping: the engine owns the weights in its checkpoints (the module must not demand a
``state_dict`` it never sees), and ZeRO-3's partitioned parameters cannot feed the EMA.

DeepSpeed itself is an optional extra that is not installed in CI; the strategy objects are built
without running their constructor (which imports deepspeed), with the attributes Lightning sets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from idforge.train.ema import EMA
from idforge.train.strategies import engine_owns_weights, zero_stage
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from tests.train.test_module_faults import _module


def _deepspeed(stage: int, load_full_weights: bool = False) -> DeepSpeedStrategy:
    s = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    s.config = {"zero_optimization": {"stage": stage}}
    s.load_full_weights = load_full_weights
    return s


def test_only_deepspeed_owns_the_weights():
    assert not engine_owns_weights(DDPStrategy())
    assert zero_stage(DDPStrategy()) == 0
    assert engine_owns_weights(_deepspeed(2)) and zero_stage(_deepspeed(2)) == 2
    assert engine_owns_weights(_deepspeed(3)) and zero_stage(_deepspeed(3)) == 3
    # ZeRO-3 resumed from one consolidated file: Lightning loads the state dict like DDP does
    assert not engine_owns_weights(_deepspeed(3, load_full_weights=True))


def _attach(module, strategy) -> None:
    module._trainer = SimpleNamespace(strategy=strategy, global_rank=0, world_size=1)


def test_resume_under_deepspeed_accepts_a_checkpoint_without_state_dict(tiny_zoo):
    module = _module(tiny_zoo)
    _attach(module, _deepspeed(2))
    module.on_load_checkpoint({"global_step": 3})  # what DeepSpeed's client_state holds
    _attach(module, DDPStrategy())
    with pytest.raises(KeyError, match="lacks .* trainable tensors"):
        module.on_load_checkpoint({"global_step": 3})  # under DDP the weights must be there


def test_ema_refuses_zero3_and_accepts_zero2(tiny_zoo):
    module = _module(tiny_zoo)
    ema = EMA(decay=0.9)
    with pytest.raises(ValueError, match="ZeRO-3 .* launch/deepspeed_zero2.json"):
        ema.on_fit_start(SimpleNamespace(strategy=_deepspeed(3)), module)
    ema.on_fit_start(SimpleNamespace(strategy=_deepspeed(2)), module)
    assert ema.shadow  # the average starts from the live trainable weights
