"""Exponential moving average of the trainable weights, as a Lightning callback.

    ema <- decay * ema + (1 - decay) * w        (every ``every_n_steps`` optimiser steps)

so after n updates from ema_0 = w_0, ema_n = decay^n w_0 + (1 - decay) sum_k decay^(n-k) w_k. The
averaged tensors are the generator's trainable state dict (adapter, identity processors, the UNet when
it trains: :meth:`IdentityGenerator.trainable_state_dict`), kept on the CPU (``device: cpu``, saves
accelerator memory) or beside the weights (``device: null``). Checkpoints hold them under ``ema``
with the same keys as ``trainable_state_dict`` (what ``idforge export`` reads when present); the
update counter is the callback's own state, so a resumed run continues the same average.
``validate_with_ema`` swaps the averaged weights in for validation and back afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


def trainable_tensors(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The live tensors the average follows: the generator's trainable state (or, for another module,
    its parameters that require grad)."""
    model = getattr(pl_module, "model", None)
    if model is not None and hasattr(model, "is_trainable"):
        return {k: v for k, v in model.state_dict(keep_vars=True).items() if model.is_trainable(k)}
    return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}


class EMA(L.Callback):
    def __init__(
        self,
        decay: float = 0.9999,
        every_n_steps: int = 1,
        device: str | None = "cpu",
        validate_with_ema: bool = False,
    ):
        """
        Args:
            decay: weight of the old average at each update (0.9999: ~10k-update horizon).
            every_n_steps: update after every n-th optimiser step (the decay applies per update).
            device: where the average lives: ``cpu``, or null for the weights' own device.
            validate_with_ema: run validation with the averaged weights.
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA.decay: must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"EMA.every_n_steps: must be >= 1, got {every_n_steps}")
        self.decay, self.every_n_steps, self.device = decay, every_n_steps, device
        self.validate_with_ema = validate_with_ema
        self.shadow: dict[str, torch.Tensor] | None = None
        self.num_updates = 0
        self._last_step = -1
        self._backup: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ the average
    def _init_shadow(self, pl_module: L.LightningModule) -> None:
        self.shadow = {
            k: v.detach().to(self.device or v.device, copy=True)
            for k, v in trainable_tensors(pl_module).items()
        }

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule) -> None:
        """One EMA update from the module's live weights."""
        if self.shadow is None:
            self._init_shadow(pl_module)
        live = trainable_tensors(pl_module)
        for k, e in self.shadow.items():
            w = live[k].detach()
            if e.is_floating_point():
                e.lerp_(w.to(e.device, e.dtype), 1.0 - self.decay)  # e + (1-d)(w - e)
            else:
                e.copy_(w)
        self.num_updates += 1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from .strategies import zero_stage

        if zero_stage(trainer.strategy) == 3:
            raise ValueError(
                "EMA: DeepSpeed ZeRO-3 partitions every parameter across ranks, so the average would "
                "follow empty shards; train with launch/deepspeed_zero2.json (or DDP) when the EMA "
                "callback is on, or remove the EMA callback"
            )
        if self.shadow is None:
            self._init_shadow(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0:  # once per optimiser step
            self.update(pl_module)
        self._last_step = step

    # ------------------------------------------------------------------ validation with the average
    @torch.no_grad()
    def _load_average(self, live: dict[str, torch.Tensor]) -> None:
        for k, e in self.shadow.items():
            live[k].data.copy_(e.to(live[k].device, live[k].dtype))

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        live = trainable_tensors(pl_module)
        if self._backup is None:
            self._backup = {k: live[k].detach().clone() for k in self.shadow}
            self._load_average(live)
        else:
            for k, b in self._backup.items():
                live[k].data.copy_(b)
            self._backup = None

    @torch.no_grad()
    def apply_to(self, pl_module: L.LightningModule) -> None:
        """Copy the averaged weights into the module for good (e.g. before exporting it in-process)."""
        if self.shadow is None:
            raise RuntimeError("EMA.apply_to: no average yet (the callback has not seen a training step)")
        if self._backup is not None:
            self._swap(pl_module)  # the live weights back first, so the average is not lost on swap-out
        self._load_average(trainable_tensors(pl_module))

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and self.shadow is not None and self._backup is None:
            self._swap(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._backup is not None:
            self._swap(pl_module)  # live weights back before any checkpoint is written

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_step": self._last_step, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self._last_step = int(state_dict["last_step"])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.shadow is not None:
            checkpoint["ema"] = {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        ema = checkpoint.get("ema")
        if ema is None:
            log.warning("checkpoint has no `ema` weights; the average restarts from the loaded weights")
            return
        expected = set(trainable_tensors(pl_module))
        if set(ema) != expected:
            missing, extra = sorted(expected - set(ema)), sorted(set(ema) - expected)
            raise KeyError(
                f"checkpoint `ema` does not match the trainable weights (missing {missing[:3]}, unknown "
                f"{extra[:3]}); resume with the config it was trained with"
            )
        live = trainable_tensors(pl_module)
        self.shadow = {k: v.to(self.device or live[k].device, live[k].dtype).clone() for k, v in ema.items()}
