"""What a distributed strategy does with the weights, for the parts of the trainer that touch them.

DDP leaves checkpointing to Lightning: ``on_save_checkpoint`` sees the full ``state_dict`` and the
module keeps only the trainable tensors. DeepSpeed does not (Lightning's ``DeepSpeedStrategy``):
the engine writes and reads the weights itself (``state_dict`` and ``optimizer_states`` are removed
from the checkpoint the module sees; with ``exclude_frozen_parameters: true`` the engine also
leaves out the frozen VAE/encoders, as the module's own filter does under DDP), and under ZeRO-3
every rank holds only a shard of each parameter, so reading ``param.data`` outside the engine's
gather gives an empty placeholder. These predicates let the module and the callbacks check for it.
"""

from __future__ import annotations

from typing import Any


def _deepspeed(strategy: Any) -> bool:
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # a Lightning without the DeepSpeed strategy: nothing to detect
        return False
    return isinstance(strategy, DeepSpeedStrategy)


def engine_owns_weights(strategy: Any) -> bool:
    """True when the strategy saves and loads the module's weights itself (DeepSpeed, except a
    ZeRO-3 run resumed from a single consolidated file with ``load_full_weights``)."""
    if not _deepspeed(strategy):
        return False
    return not (getattr(strategy, "load_full_weights", False) and zero_stage(strategy) == 3)


def zero_stage(strategy: Any) -> int:
    """The DeepSpeed ZeRO stage (0 for any other strategy)."""
    if not _deepspeed(strategy):
        return 0
    config = getattr(strategy, "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


__all__ = ["engine_owns_weights", "zero_stage"]
