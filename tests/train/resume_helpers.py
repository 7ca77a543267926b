"""Callbacks the resume tests put into ``idforge train fit`` runs (by class path)."""

from __future__ import annotations

import os
import signal

import lightning as L


class LossRecorder(L.Callback):
    """Appends ``step loss`` (the loss's exact float repr) to a file after every training batch."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(loss.detach())!r}\n")


class SignalAtStep(L.Callback):
    """Sends ``signum`` to this process when a training batch starts at ``step`` (after the checkpoint of
    the previous step was written): ``kill -9`` or a pre-emption signal at a known point."""

    def __init__(self, step: int, signum: int = int(signal.SIGKILL)):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
