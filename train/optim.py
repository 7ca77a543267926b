"""Optimiser parameter groups and the learning-rate schedule, as configuration.

Diff-ID trains everything with Adam at lr 1e-5 (appendix A.1), which is the default here: no
groups, a constant rate. A randomly initialised adapter next to a pretrained UNet wants a larger
rate than the UNet (IP-Adapter trains its adapter at 1e-4; FlashFace uses 2e-5 for ReferenceNet
and UNet), so groups select parameters by name pattern and give each its own rate:

    param_groups:
      - {name: adapter, match: ["adapter.*", "unet.*.processor.*"], lr: 1.0e-4}
      - {name: unet, match: ["unet.*"], lr: 1.0e-5}

Names are those of :class:`idforge.models.generator.IdentityGenerator` parameters; a parameter goes
to the first group whose pattern (``fnmatch``) matches it. A trainable parameter that no group
matches is an error; a group that matches nothing (e.g. a ``referencenet`` group in a config shared
with runs that have none) is logged and left out.

Schedule: linear warm-up over ``warmup_steps``, then ``constant`` or ``cosine`` decay to
``min_lr_ratio`` x the group's rate at ``total_steps`` (default: the trainer's ``max_steps``).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

log = logging.getLogger(__name__)


@dataclass
class ParamGroup:
    """One optimiser group: the parameters whose names match ``match``, trained at ``lr``."""

    name: str
    match: list[str] = field(default_factory=list)
    """fnmatch patterns over generator parameter names (``adapter.*``, ``unet.*.processor.*``)."""
    lr: float = 1e-5
    weight_decay: float | None = None
    """None: the optimiser's own default."""

    def __post_init__(self):
        if not self.match:
            raise ValueError(f"param_groups[{self.name}].match: give at least one name pattern")
        if self.lr <= 0:
            raise ValueError(f"param_groups[{self.name}].lr: must be > 0, got {self.lr}")


@dataclass
class LRSchedule:
    """Warm-up then constant or cosine decay, stepped every optimiser step."""

    warmup_steps: int = 0
    decay: Literal["constant", "cosine"] = "constant"
    total_steps: int | None = None
    """Steps of the whole schedule (cosine reaches its minimum there); None: ``trainer.max_steps``."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of each group's rate."""

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"lr_schedule.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule.decay: must be 'constant' or 'cosine', got {self.decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr_schedule.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")

    def factor(self, step: int, total: int | None) -> float:
        """Multiplier of the base rates after ``step`` optimiser steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        if not total or total <= self.warmup_steps:
            raise ValueError(
                "lr_schedule: cosine decay needs total_steps (or trainer.max_steps) > warmup_steps, got "
                f"{total}; set model.lr_schedule.total_steps"
            )
        progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_param_groups(
    named_params: list[tuple[str, torch.nn.Parameter]], groups: list[ParamGroup] | None
) -> list[dict]:
    """torch optimiser groups ({"params", "lr", "name"}) for the trainable ``named_params``."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: check generator.train_unet and the adapter config")
    if not groups:
        return [{"params": [p for _, p in params], "name": "all"}]
    buckets: dict[str, list] = {g.name: [] for g in groups}
    unmatched = []
    for name, p in params:
        group = next((g for g in groups if any(fnmatch.fnmatchcase(name, pat) for pat in g.match)), None)
        if group is None:
            unmatched.append(name)
        else:
            buckets[group.name].append(p)
    if unmatched:
        raise ValueError(
            f"param_groups: {len(unmatched)} trainable parameters match no group, e.g. {unmatched[:3]}; "
            "add a pattern that covers them (e.g. a last group with match: ['*'])"
        )
    out = []
    for g in groups:
        if not buckets[g.name]:
            log.info("param group %r matches no trainable parameter; left out", g.name)
            continue
        entry = {"params": buckets[g.name], "lr": g.lr, "name": g.name}
        if g.weight_decay is not None:
            entry["weight_decay"] = g.weight_decay
        out.append(entry)
        log.info(
            "param group %s: %d tensors, %d parameters, lr %g",
            g.name,
            len(entry["params"]),
            sum(p.numel() for p in entry["params"]),
            g.lr,
        )
    return out
