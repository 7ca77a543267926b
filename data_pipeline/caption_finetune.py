"""Fine-tune BLIP on attribute captions (Diff-ID sec. 3.1) -> a folder usable by ``BlipCaptioner``.

Diff-ID writes sentence captions from CelebA-HQ's 40 attributes (:func:`caption.celeba_sentence`),
fine-tunes BLIP on those (image, caption) pairs, then captions FFHQ / LAION-Face with it. The loss is
BLIP's language-modelling cross-entropy of the caption tokens given the image (Li et al. 2022, sec.
3.2, "LM" objective), padding positions ignored. AdamW, linear warm-up then constant; the vision
encoder can be frozen (``train_vision=False``, the default) to fit large BLIP on one GPU.
Exposed on the command line as ``idforge caption-finetune``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    epochs: int = 3
    lr: float = 1e-5
    batch_size: int = 16
    warmup_steps: int = 100
    weight_decay: float = 0.05
    train_vision: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    """Training precision of the forward pass (autocast on CUDA for float16 / bfloat16)."""
    seed: int = 0
    max_length: int = 64

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("FinetuneConfig needs epochs >= 1, batch_size >= 1, lr > 0, warmup_steps >= 0")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"FinetuneConfig.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")


def finetune_blip(
    model_path: str | Path,
    images: list,
    captions: list[str],
    out_dir: str | Path,
    epochs: int = 3,
    lr: float = 1e-5,
    batch_size: int = 16,
    **kw,
) -> tuple[Path, dict]:
    """Fine-tune BLIP at ``model_path`` on PIL ``images`` and their ``captions``; saves model +
    processor to ``out_dir``; returns (out_dir, history with per-step ``loss``)."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, **kw)
    if len(images) != len(captions) or not images:
        raise ValueError(
            f"finetune_blip needs as many captions as images (>= 1): {len(images)} vs {len(captions)}"
        )
    torch.manual_seed(cfg.seed)
    processor = BlipProcessor.from_pretrained(model_path)
    model = BlipForConditionalGeneration.from_pretrained(model_path).to(cfg.device).train()
    if not cfg.train_vision:
        model.vision_model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    autocast = cfg.device.startswith("cuda") and cfg.dtype != "float32"
    pad = processor.tokenizer.pad_token_id
    bos = model.config.text_config.bos_token_id
    g = torch.Generator().manual_seed(cfg.seed)
    history = {"loss": [], "config": asdict(cfg)}
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(images), generator=g).tolist()
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            batch = processor(
                images=[images[j].convert("RGB") for j in idx],
                text=[captions[j] for j in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=cfg.max_length,
            )
            batch = batch.to(cfg.device)
            input_ids = batch["input_ids"].clone()  # (B, T): [CLS] caption [SEP] [PAD]...
            input_ids[:, 0] = bos  # BLIP decodes from [DEC], as generate() does
            labels = input_ids.masked_fill(input_ids == pad, -100)
            with torch.autocast("cuda", dtype=getattr(torch, cfg.dtype), enabled=autocast):
                loss = model(
                    pixel_values=batch["pixel_values"],
                    input_ids=input_ids,
                    attention_mask=batch["attention_mask"],
                    labels=labels,
                ).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            history["loss"].append(float(loss.detach()))
        log.info("caption finetune epoch %d: last loss %.4f", epoch, history["loss"][-1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    (out / "finetune_history.json").write_text(json.dumps(history))
    return out, history


def load_pairs(data: str | Path, limit: int | None = None) -> tuple[list, list[str]]:
    """(PIL images, captions) from a JSONL of ``{"image": path, "caption": text}`` (paths relative to
    the file), or from a CelebA folder holding ``list_attr_celeba.txt`` (captions written from the
    attributes by :func:`caption.celeba_sentence`; images in the folder or its ``img_align_celeba/``)."""
    from PIL import Image

    from .caption import celeba_sentence, read_celeba_attributes

    data = Path(data)
    pairs: list[tuple[Path, str]] = []
    if data.is_file():
        for n, line in enumerate(data.read_text().splitlines()):
            if line.strip():
                rec = json.loads(line)
                if "image" not in rec or "caption" not in rec:
                    raise ValueError(f"{data}:{n + 1}: expected keys 'image' and 'caption'")
                pairs.append((data.parent / rec["image"], rec["caption"]))
    elif (data / "list_attr_celeba.txt").is_file():
        img_dir = data / "img_align_celeba" if (data / "img_align_celeba").is_dir() else data
        for name, attrs in read_celeba_attributes(data / "list_attr_celeba.txt").items():
            if (img_dir / name).is_file():
                pairs.append((img_dir / name, celeba_sentence(attrs)))
    else:
        raise FileNotFoundError(
            f"caption-finetune data {data}: give a JSONL of image/caption pairs or a CelebA "
            "folder with list_attr_celeba.txt"
        )
    pairs = pairs[:limit] if limit else pairs
    if not pairs:
        raise ValueError(f"caption-finetune data {data}: no (image, caption) pairs found")
    return [Image.open(p).convert("RGB") for p, _ in pairs], [c for _, c in pairs]
