"""``idforge caption-finetune``: BLIP fine-tuned on attribute captions (Diff-ID sec. 3.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def caption_finetune(
    model: str,
    data: Path,
    out: Path,
    epochs: int = 3,
    lr: float = 1e-5,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    train_vision: bool = False,
    limit: int | None = None,
) -> int:
    """Fine-tune BLIP on (image, attribute caption) pairs into a folder the `blip` captioner loads.

    Args:
        model: BLIP hub name (cached) or local folder to start from.
        data: JSONL of image/caption pairs, or a CelebA folder (captions written from its attributes).
        out: output folder, loadable by the blip captioner (`captioner_options.model`).
        epochs: passes over the pairs.
        lr: AdamW learning rate.
        batch_size: pairs per step.
        device: where to train (cpu, cuda).
        dtype: forward-pass precision (autocast on CUDA for float16 / bfloat16).
        train_vision: also train the vision encoder (default: frozen, fits large BLIP on one GPU).
        limit: use at most this many pairs.
    """
    from idforge.data_pipeline.caption_finetune import finetune_blip, load_pairs

    images, captions = load_pairs(data, limit)
    path, history = finetune_blip(
        model,
        images,
        captions,
        out,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        train_vision=train_vision,
    )
    losses = history.get("loss") or []
    tail = f", final loss {losses[-1]:.4f}" if losses else ""
    print(
        f"fine-tuned captioner written to {path}{tail}; use it with caption backend 'blip' and model={path}"
    )
    return 0
