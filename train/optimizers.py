"""Optimisers from optional extras, usable as the LightningCLI ``optimizer`` class path.

    optimizer:
      class_path: idforge.train.optimizers.AdamW8bit     # needs the `bnb` extra
      init_args: {lr: 1.0e-4, weight_decay: 0.01}

``AdamW8bit`` builds bitsandbytes' ``AdamW8bit`` (8-bit optimiser states: ~75 % less optimiser memory
than AdamW, Dettmers et al. 2022); without bitsandbytes it fails at construction, naming the extra.
"""

from __future__ import annotations

import torch


class AdamW8bit(torch.optim.Optimizer):
    """bitsandbytes.optim.AdamW8bit, or an ImportError that says how to install it."""

    def __new__(
        cls,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        try:
            import bitsandbytes
        except ImportError as exc:
            raise ImportError(
                "model.optimizer: AdamW8bit needs bitsandbytes, which is not installed; install the extra "
                "with `pip install 'idforge[bnb]'` or use torch.optim.AdamW"
            ) from exc
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
