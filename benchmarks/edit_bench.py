"""Edit-path benchmark: single-image fine-tuning + one masked edit on random-weight SD3.

Default (GPU): SD3-medium-sized transformer (24 layers, 24 heads x 64, joint dim 4096) with random
weights at ``--resolution`` px; FlowID's default work = 50 optimiser steps x 10 accumulated images,
50-step schedule for inversion and edit. ``--tiny`` runs the tiny zoo SD3 on a CPU. Prints wall
times, peak GPU memory and the command.

    python benchmarks/edit_bench.py --tiny --finetune-steps 10            # CPU, reduced size
    python benchmarks/edit_bench.py --resolution 1024 --dtype bfloat16    # one H100
    python benchmarks/edit_bench.py --micro-batch 1                       # FlowID's batch-1 loop
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(folder: Path, tiny: bool, resolution: int):
    from idforge.models.zoo import TinySD3Config, build_tiny_sd3

    if tiny:
        return build_tiny_sd3(folder, TinySD3Config(resolution=resolution))
    # SD3-medium's transformer sizes; tiny text encoders / VAE (their cost is one pass each)
    cfg = TinySD3Config(resolution=resolution, layers=24, heads=24, head_dim=64, text_hidden=64,
                        joint_attention_dim=4096, latent_channels=16)  # fmt: skip
    return build_tiny_sd3(folder, cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny SD3 (CPU)")
    ap.add_argument("--resolution", type=int, default=None, help="px (default 1024, tiny 64)")
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--grad-accum", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=10)
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adam8bit"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strength", type=float, default=0.9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    from idforge.inference.edit import Editor, FinetuneConfig, load_backbone

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = args.resolution or (64 if args.tiny else 1024)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = build(Path(tmp) / "sd3", args.tiny, res)
        bb = load_backbone(folder, device=device, dtype=getattr(torch, args.dtype))
        build_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in bb.denoiser.parameters())
        image = torch.rand(1, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
        ed = Editor(bb, image)
        src, tgt = "a person's face with red hair", "a person's face with blond hair"
        bb.condition(src), bb.condition(tgt)
        bb.offload_text_encoders()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        cfg = FinetuneConfig(steps=args.finetune_steps, grad_accum=args.grad_accum, micro_batch=args.micro_batch,
                             method=args.method, optimizer=args.optimizer,
                             gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
        ed.finetune(src, cfg)
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        res_edit = ed.edit(src, tgt, "red hair", strength=args.strength, steps=args.steps)
        if device == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; denoiser params {n_params / 1e6:.3f} M;"
          f" {res} px; dtype {args.dtype}; build+load {build_s:.1f} s")  # fmt: skip
    print(f"fine-tune: {args.finetune_steps} steps x {args.grad_accum} images (micro-batch {args.micro_batch}, "
          f"{args.method}, {args.optimizer}): {t2 - t1:.2f} s")  # fmt: skip
    k = len(res_edit.trajectory) - 1
    print(
        f"edit: {k}-step inversion + mask + {k}-step masked denoising: {t3 - t2:.2f} s; mask area {float(res_edit.mask.mean()):.2f}"
    )
    print(f"total (fine-tune + edit): {t3 - t1:.2f} s; peak GPU memory {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
