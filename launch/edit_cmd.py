"""``idforge edit``: FlowID / FINEdits editing of one photo (SPEC.md sec. 5, Algorithm 1)."""

from __future__ import annotations

import json
from pathlib import Path


def edit(
    image: Path | None = None,
    model: Path | None = None,
    out: Path = Path("edit_out"),
    source: str = "a person's face",
    target: str = "a person's face",
    concept: str | None = None,
    preset: str | None = None,
    strength: float = 0.9,
    kernel: int = 15,
    mode: str = "removal",
    mask_at: float = 0.5,
    blur: float = 0.0,
    no_mask: bool = False,
    steps: int = 50,
    finetune_steps: int = 100,
    finetune_method: str = "full",
    lora_rank: int = 16,
    optimizer: str = "adamw",
    lr: float = 5e-5,
    grad_accum: int = 10,
    micro_batch: int = 10,
    gradient_checkpointing: bool = False,
    then: list[dict] | None = None,
    batch: Path | None = None,
    resolution: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> int:
    """Edit a photo: fine-tune on it, invert with the source prompt, mask the concept, denoise with the target.

    Args:
        image: the photo to edit.
        model: an SD3 diffusers folder, or a folder written by `idforge export`.
        out: output folder: edited.png and mask.png (edit_NN_* for sequential edits, one subfolder per batch row).
        source: prompt describing the photo, naming the concept (e.g. "a person's face, open wound on the forehead").
        target: prompt describing the wanted result (e.g. "a person's face").
        concept: words of the prompt that change (in source for removal, in target for addition); None: no mask.
        preset: FINEdits edit type setting strength and kernel: hair_color, hat, glasses, hair, beard, earrings, smiling.
        strength: inversion strength t_s in (0, 1].
        kernel: max-pool dilation kernel on SD3's 64-token grid (FINEdits Table 3), scaled to the model's grid.
        mode: removal (mask from the inversion) or addition (mask from a first denoising pass).
        mask_at: t_M as a fraction of t_s, where the attention mask is read.
        blur: Gaussian sigma of the mask in latent pixels (0: binary mask).
        no_mask: edit without a mask (the papers' ablation).
        steps: steps of a full 0 -> 1 schedule (round(steps * strength) each way).
        finetune_steps: single-image fine-tuning optimiser steps (0: none).
        finetune_method: full or lora.
        lora_rank: LoRA rank.
        optimizer: adamw or adam8bit (needs the bnb extra).
        lr: fine-tuning learning rate.
        grad_accum: accumulated samples per optimiser step.
        micro_batch: accumulated samples per forward (grad_accum: one batched forward).
        gradient_checkpointing: trade compute for memory while fine-tuning.
        then: further edits of the result, each a JSON object with target, concept and optional source/preset/strength/kernel/mode (the tuned model is reused).
        batch: JSONL file, one edit per line: image, source, target, concept, optional preset/strength/kernel/mode (relative image paths are under the file's folder).
        resolution: square size the photo is resized to (default: the model's).
        dtype: float32, bfloat16 or float16.
        device: where to run (cpu, cuda).
        seed: seed of the fine-tuning draws.
    """
    import torch
    from idforge.inference.edit import PRESETS, Editor, FinetuneConfig, load_backbone
    from idforge.inference.edit.output import load_photo, save_marked
    from tqdm import tqdm

    if model is None or not model.is_dir():
        raise FileNotFoundError(
            f"--model {model}: no such folder (an SD3 folder or one written by `idforge export`)"
        )
    if (image is None) == (batch is None):
        raise ValueError("give exactly one of --image (one photo) or --batch (a JSONL file of edits)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    rows = [{"image": str(image), "source": source, "target": target, "concept": concept, "preset": preset}]
    base = Path.cwd()
    if batch is not None:
        if not batch.is_file():
            raise FileNotFoundError(f"--batch {batch}: no such file (JSONL: image, source, target, concept)")
        base = batch.parent
        rows = [json.loads(line) for line in batch.read_text().splitlines() if line.strip()]
        for i, r in enumerate(rows):
            missing = {"image", "target"} - r.keys()
            if missing:
                raise ValueError(f"--batch {batch}: line {i + 1} lacks {', '.join(sorted(missing))}")
    ft = FinetuneConfig(
        steps=finetune_steps,
        lr=lr,
        grad_accum=grad_accum,
        micro_batch=micro_batch,
        method=finetune_method,
        lora_rank=lora_rank,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
    )

    def settings(r: dict) -> dict:
        name = r.get("preset")
        if name is not None and name not in PRESETS:
            raise ValueError(f"preset {name!r}: choose one of {', '.join(PRESETS)}")
        p = PRESETS.get(name)
        return {
            "strength": float(r.get("strength", p.strength if p else strength)),
            "kernel": int(r.get("kernel", p.kernel if p else kernel)),
            "mode": r.get("mode", mode),
        }

    for i, row in enumerate(rows):
        folder = out if batch is None else out / f"{i:04d}"
        # a fresh backbone per photo: fine-tuning is per image; sequential edits share it
        bb = load_backbone(model, device=device, dtype=getattr(torch, dtype), resolution=resolution)
        photo = Path(row["image"]).expanduser()
        photo = photo if photo.is_absolute() else base / photo
        x, exif = load_photo(photo, bb.resolution)
        ed = Editor(bb, x)
        src = row.get("source", source)
        if ft.steps:
            bar = tqdm(total=ft.steps, desc=f"fine-tune {photo.name}", leave=False)
            ed.finetune(
                src,
                ft,
                progress=lambda s, loss, bar=bar: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")),
            )
            bar.close()
        chain = [row] + list(row.get("then", then or []))
        for j, step in enumerate(chain):
            s = settings(step)
            src_j = step.get("source", src if j == 0 else chain[j - 1]["target"])
            res = ed.edit(
                src_j,
                step["target"],
                None if no_mask else step.get("concept"),
                steps=steps,
                mask_at=mask_at,
                blur=blur,
                chain=j > 0,
                **s,
            )
            prefix = "" if len(chain) == 1 else f"edit_{j:02d}_"
            info = {
                "source": src_j,
                "target": step["target"],
                "concept": step.get("concept"),
                **s,
                "finetune_steps": ed.tuned_steps,
                "model": str(model),
            }
            save_marked(((res.image[0] + 1) / 2), folder / f"{prefix}edited.png", exif, info)
            print(folder / f"{prefix}edited.png")
            if res.mask is not None:
                m = torch.nn.functional.interpolate(res.mask, size=res.image.shape[-2:], mode="nearest")
                save_marked(m[0], folder / f"{prefix}mask.png", None, info)
                print(folder / f"{prefix}mask.png")
    return 0
