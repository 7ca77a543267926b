"""Single-image fine-tuning, FlowID sec. 3 / FINEdits sec. 3.2 (Algorithm 1, line 1).

The backbone's own training objective (:meth:`EditBackbone.training_loss`: flow matching with
logit-normal t for SD3, the epsilon / v loss for UNets) on ONE image-prompt pair; lr 5e-5, batch 1
with gradient accumulation 10, 100-1000 optimiser steps (papers), AdamW or 8-bit Adam (``bnb``
extra, what FINEdits used to fit a 24 GB GPU), full or LoRA (peft, through diffusers'
``add_adapter``). The ``grad_accum`` accumulated samples share the image and prompt and differ only
in (t, noise), so they run as ONE batched forward of ``micro_batch`` samples (mean loss; the same
gradient as ``grad_accum`` batch-1 backward passes) unless ``micro_batch`` splits them for memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

METHODS = ("full", "lora")
OPTIMIZERS = ("adamw", "adam8bit")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class FinetuneConfig:
    steps: int = 100
    """Optimiser steps (papers: 100-1000)."""
    lr: float = 5e-5
    grad_accum: int = 10
    """Samples (t, noise) accumulated per optimiser step (batch 1 each)."""
    micro_batch: int = 10
    """Accumulated samples per forward (``grad_accum``: all in one forward; 1: FlowID's loop)."""
    method: str = "full"
    """``full`` (every denoiser weight) or ``lora`` (peft LoRA on the attention projections)."""
    lora_rank: int = 16
    optimizer: str = "adamw"
    """``adamw`` or ``adam8bit`` (bitsandbytes; ``pip install 'idforge[bnb]'``)."""
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"finetune method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"finetune optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.steps < 0 or self.grad_accum < 1 or self.micro_batch < 1:
            raise ValueError("finetune steps must be >= 0 and grad_accum, micro_batch >= 1")


def trainable_parameters(denoiser: torch.nn.Module, cfg: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Mark what trains (LoRA: only ``lora_`` weights, installed once) and return it."""
    if cfg.method == "lora":
        if not getattr(denoiser, "_edit_lora", False):
            from peft import LoraConfig

            denoiser.add_adapter(
                LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=cfg.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=LORA_TARGETS,
                )
            )
            denoiser._edit_lora = True
        for name, p in denoiser.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        for p in denoiser.parameters():
            p.requires_grad_(True)
    return [p for p in denoiser.parameters() if p.requires_grad]


def make_optimizer(params, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError(
                "finetune optimizer 'adam8bit' needs bitsandbytes: pip install 'idforge[bnb]' "
                "(or use optimizer 'adamw')"
            ) from e
        return bnb.optim.AdamW8bit(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr)


def finetune(backbone, z0: torch.Tensor, prompt: str, cfg: FinetuneConfig, progress=None) -> list[float]:
    """Fine-tune ``backbone.denoiser`` in place on (z0 (1, C, h, w), prompt); returns per-step losses.
    ``progress(step, loss)`` is called after every optimiser step (the CLI's bar)."""
    net = backbone.denoiser
    cond = backbone.condition(prompt)
    params = trainable_parameters(net, cfg)
    opt = make_optimizer(params, cfg)
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    net.train()
    try:
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            total, done = 0.0, 0
            t_all, eps_all = backbone.draw_noise(
                cfg.grad_accum, z0.shape[1:], gen
            )  # the same draws however batched
            while done < cfg.grad_accum:
                n = min(cfg.micro_batch, cfg.grad_accum - done)
                sl = slice(done, done + n)
                loss = backbone.training_loss(z0.expand(n, *z0.shape[1:]), cond, t_all[sl], eps_all[sl])
                (loss * (n / cfg.grad_accum)).backward()
                total += float(loss.detach()) * n
                done += n
            opt.step()
            losses.append(total / cfg.grad_accum)
            if progress is not None:
                progress(step, losses[-1])
    finally:
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            net.disable_gradient_checkpointing()
    log.info(
        "fine-tuned %d steps (%s): loss %.4f -> %.4f",
        cfg.steps,
        cfg.method,
        *(losses[:1] + losses[-1:]) or (0, 0),
    )
    return losses
