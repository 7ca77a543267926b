"""Checkpoints that survive crashes and pre-emption: atomic writes, adapter-only safetensors, signal
saves and the RNG states an exact resume needs.

- :class:`AtomicCheckpointIO` (``trainer.plugins``): every file is written to a temporary name in the
  same folder, flushed and fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX),
  so a crash or ``kill -9`` mid-write leaves the previous checkpoint intact and never a truncated
  one. Beside each ``X.ckpt`` it writes ``X.safetensors``: the trainable weights alone, with the keys
  of ``IdentityGenerator.trainable_state_dict`` (and ``X.ema.safetensors`` when the checkpoint has EMA
  weights); retention (``ModelCheckpoint.save_top_k``) removes them with their checkpoint.
- :class:`PreemptionCheckpoint` (callback): SIGTERM (and SIGUSR1, SLURM's usual pre-emption warning)
  makes the run finish its current step, write ``last.ckpt`` and exit with status 0. Under SLURM
  with ``SLURMEnvironment(auto_requeue=True)`` Lightning owns SIGUSR1 (it saves and requeues the
  job), so only SIGTERM is handled here.
- :class:`RNGState` (callback): saves and restores the global torch / numpy / python RNG states.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def adapter_tensors(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint, keyed like ``IdentityGenerator.trainable_state_dict``
    (the module saves only those, under ``model.``)."""
    return {
        k.removeprefix("model."): v.detach().cpu().contiguous().clone()
        for k, v in checkpoint.get("state_dict", {}).items()
        if k.startswith("model.")
    }


def _safetensors_bytes(tensors: dict[str, torch.Tensor], checkpoint: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    hp = checkpoint.get("hyper_parameters", {})
    meta = {"global_step": str(checkpoint.get("global_step", "")), "format": "pt"}
    if "generator" in hp:
        meta["generator"] = json.dumps(hp["generator"], default=str)
    return save(tensors, metadata=meta)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO with atomic writes and adapter-only safetensors (see module docstring)."""

    def __init__(self, adapter_safetensors: bool = True):
        """
        Args:
            adapter_safetensors: also write the trainable weights alone as ``<name>.safetensors``.
        """
        super().__init__()
        self.adapter_safetensors = adapter_safetensors

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint: storage_options is not supported, got "
                f"{storage_options!r}; leave it unset"
            )
        path = Path(path)
        if self.adapter_safetensors:
            for suffix, tensors in (
                (".safetensors", adapter_tensors(checkpoint)),
                (
                    ".ema.safetensors",
                    {k: v.contiguous().clone() for k, v in checkpoint.get("ema", {}).items()},
                ),
            ):
                if tensors:
                    data = _safetensors_bytes(tensors, checkpoint)
                    atomic_write(path.with_suffix(suffix), lambda f, d=data: f.write(d))
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        for suffix in (".safetensors", ".ema.safetensors"):
            Path(path).with_suffix(suffix).unlink(missing_ok=True)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM / SIGUSR1: finish the step, save ``last.ckpt``, exit 0 (see module docstring)."""

    def __init__(self, signals: list[str] | None = None):
        """
        Args:
            signals: extra signals treated like SIGTERM (default ``[SIGUSR1]``; SIGTERM is always
                handled, through Lightning's own handler).
        """
        self.signals = ["SIGUSR1"] if signals is None else list(signals)
        for name in self.signals:
            if not hasattr(signal, name):
                raise ValueError(f"PreemptionCheckpoint.signals: unknown signal {name!r}; use e.g. SIGUSR1")
        self._previous: dict[int, Any] = {}
        self.saved_path: str | None = None

    def _lightning_owns(self, trainer: L.Trainer, sig: int) -> bool:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        return isinstance(env, SLURMEnvironment) and env.auto_requeue and sig == env.requeue_signal

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def handler(signum, frame):
            log.info("received signal %d: saving a checkpoint after this step, then exiting", signum)
            trainer._signal_connector._sigterm_notifier_fn(signum, frame)  # the path SIGTERM takes

        for name in self.signals:
            sig = getattr(signal, name)
            if not self._lightning_owns(trainer, sig):
                self._previous[sig] = signal.signal(sig, handler)

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.on_train_end(trainer, pl_module)
        cb = trainer.checkpoint_callback
        folder = cb.dirpath if isinstance(cb, ModelCheckpoint) and cb.dirpath else None
        if folder is None:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(folder, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        self.saved_path = path
        log.warning(
            "pre-empted at step %d: saved %s; resume with --ckpt_path last", trainer.global_step, path
        )


class RNGState(L.Callback):
    """Saves the global torch (CPU and CUDA), numpy and python RNG states and restores them on resume."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
