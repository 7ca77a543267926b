"""``torch.compile`` for the generator's UNet, switched on as a Lightning callback.

The UNet is compiled in place (``nn.Module.compile``), so its parameters, state-dict keys,
checkpoints, EMA and exports are unchanged; only its forward runs through the compiler. It is a
callback rather than a module option so that configs turn it on without touching the model's
hyper-parameters:

    trainer:
      callbacks:
        - class_path: idforge.train.compile.CompileUNet
          init_args: {mode: max-autotune-no-cudagraphs}
"""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class CompileUNet(L.Callback):
    def __init__(
        self,
        mode: str | None = None,
        backend: str = "inductor",
        fullgraph: bool = False,
        dynamic: bool | None = None,
    ):
        """
        Args:
            mode: torch.compile mode (``default``, ``reduce-overhead``, ``max-autotune``, ...).
            backend: compiler backend (``inductor``; ``eager`` checks the wiring without compiling).
            fullgraph: fail on graph breaks instead of falling back.
            dynamic: dynamic shapes (None: torch decides).
        """
        self.options = {"mode": mode, "backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        unet = pl_module.model.unet
        unet.compile(**self.options)
        log.info("compiled the UNet with torch.compile(%s)", self.options)
