"""Optional training extras (``deepspeed``, ``wandb``): checked when the configuration asks for them.

DeepSpeed and Weights & Biases are heavy, optional installs (``pip install idforge[deepspeed]`` /
``idforge[wandb]``). A configuration that names a DeepSpeed strategy or a ``WandbLogger`` without the
package fails here, before any model loads, with one line naming the option and the extra, instead of
Lightning's import error deep inside trainer construction. Wandb runs offline unless the user set
``WANDB_MODE`` (``WANDB_MODE=online`` to sync): long cluster runs must not hang on a login prompt.

The DeepSpeed ZeRO configs ship beside this module (``deepspeed_zero2.json``, ``deepspeed_zero3.json``);
:func:`deepspeed_config` gives their paths.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .errors import UsageError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEEPSPEED_CONFIGS = {"zero2": "deepspeed_zero2.json", "zero3": "deepspeed_zero3.json"}


def deepspeed_config(name: str) -> Path:
    """Path of a shipped DeepSpeed config by short name (``zero2`` / ``zero3``)."""
    if name not in DEEPSPEED_CONFIGS:
        raise ValueError(f"deepspeed config {name!r}: unknown; choose one of {sorted(DEEPSPEED_CONFIGS)}")
    return HERE / DEEPSPEED_CONFIGS[name]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _get(node, key: str):
    if node is None:
        return None
    if isinstance(node, dict):
        return node.get(key)
    return getattr(node, key, None)


def _names(value) -> list[str]:
    """The class paths / aliases a strategy or logger option holds (string, class_path node, list)."""
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _names(v)]
    if isinstance(value, str):
        return [value]
    path = _get(value, "class_path")
    return [str(path)] if path else [type(value).__name__]


def check_train_extras(trainer) -> None:
    """Raise :class:`UsageError` when ``trainer.strategy`` / ``trainer.logger`` need a missing extra;
    default ``WANDB_MODE`` to offline when a wandb logger is configured."""
    strategies = [n for n in _names(_get(trainer, "strategy")) if "deepspeed" in n.lower()]
    if strategies and not _installed("deepspeed"):
        raise UsageError(
            f"trainer.strategy: {strategies[0]!r} needs DeepSpeed, which is not installed; install the "
            "extra with `pip install 'idforge[deepspeed]'` or use --trainer.strategy ddp"
        )
    wandb = [n for n in _names(_get(trainer, "logger")) if "wandb" in n.lower()]
    if wandb:
        if not _installed("wandb"):
            raise UsageError(
                f"trainer.logger: {wandb[0]!r} needs wandb, which is not installed; install the extra "
                "with `pip install 'idforge[wandb]'` or log to CSV/TensorBoard (--trainer.logger "
                "lightning.pytorch.loggers.CSVLogger)"
            )
        if "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            log.info("WANDB_MODE=offline (set WANDB_MODE=online to sync the run)")
