"""``idforge edit``: FlowID / FINEdits editing of one photo (SPEC.md sec. 5, Algorithm 1)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

REQUIRED = ("image", "target")
"""Columns every batch row needs; the others (source, concept, preset, strength, kernel, mode,
guidance_scale, negative, then) fall back to the command's options, and ``references`` (the person's other photos) is read only by
``idforge eval`` (FlowID's IP against their mean embedding, :mod:`idforge.eval.edits`)."""


def batch_path(value: str, batch: Path) -> Path:
    """A photo path of a batch row: ``~`` expanded, relative paths under the batch file's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else batch.parent / p


def read_batch(path: Path) -> list[dict]:
    """Edits of a ``--batch`` file, one per row: JSONL (one object a line) or CSV (a header row naming
    the columns; empty cells take the command's options; ``then`` holds a JSON list of further edits;
    ``references`` a ``;``-separated list of photo paths, a JSON list in JSONL).

    Raises a one-line error naming the file, the row (its line in the file) and what is missing."""
    return [r for _, r in read_batch_lines(path)]


def read_batch_lines(path: Path) -> list[tuple[int, dict]]:
    """(line in the file, row) of each edit of :func:`read_batch`, for errors that name the line."""
    if not path.is_file():
        raise FileNotFoundError(
            f"--batch {path}: no such file (JSONL or CSV: image, source, target, concept)"
        )
    text = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        header = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(
                f"--batch {path}: the header (line 1: {', '.join(header) or 'empty'}) has no "
                f"{' or '.join(repr(c) for c in missing)} column; add it"
            )
        for row in reader:
            line = reader.line_num
            r = {
                k.strip(): v.strip() for k, v in row.items() if k is not None and v is not None and v.strip()
            }
            if None in row:
                raise ValueError(
                    f"--batch {path}: line {line} has more cells than the header's {len(header)}"
                )
            if "then" in r:
                try:
                    r["then"] = json.loads(r["then"])
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"--batch {path}: line {line}, column 'then' is not a JSON list ({e})"
                    ) from e
            if "references" in r:
                r["references"] = [p.strip() for p in r["references"].split(";") if p.strip()]
            rows.append((line, r))
    else:
        for line, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                rows.append((line, json.loads(raw)))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"--batch {path}: line {line} is not a JSON object ({e}); or name a .csv"
                ) from e
    for line, r in rows:
        missing = [c for c in REQUIRED if c not in r]
        if missing:
            raise ValueError(
                f"--batch {path}: line {line} has no {' or '.join(repr(c) for c in missing)}; every row needs "
                f"{' and '.join(REQUIRED)}"
            )
        refs = r.get("references")
        if refs is not None and not (isinstance(refs, list) and all(isinstance(p, str) for p in refs)):
            raise ValueError(
                f"--batch {path}: line {line}, column 'references' is {refs!r}; give a list of photo "
                f"paths (JSONL) or paths separated by ';' (CSV)"
            )
    if not rows:
        raise ValueError(f"--batch {path}: no edits in the file; give one row per edit")
    return rows


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
    guidance_scale: float = 1.0,
    negative: str | None = None,
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
    offload_text_encoders: bool | None = None,
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
        guidance_scale: guidance of the editing pass, p(negative) + w (p(target) - p(negative)); 1: none (the papers' Algorithm 1). Raise it when the target prompt barely changes the result.
        negative: the guidance's negative prompt (default: the source prompt, so guidance amplifies what the target changes; "" for classifier-free guidance).
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
        batch: JSONL or CSV (.csv, header row) file, one edit per row: image, target, optional source/concept/preset/strength/kernel/mode/guidance_scale/negative/then, and references (the person's other photos, read only by `idforge eval` for IP; a JSON list, `;`-separated in CSV); relative paths are under the file's folder.
        resolution: square size the photo is resized to (default: the model's).
        dtype: float32, bfloat16 or float16.
        device: where to run (cpu, cuda).
        offload_text_encoders: keep the text encoders on the CPU except while prompts are encoded (once per new prompt); default: on for cuda.
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
        raise ValueError("give exactly one of --image (one photo) or --batch (a JSONL or CSV file of edits)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    rows = [{"image": str(image), "source": source, "target": target, "concept": concept, "preset": preset}]
    base = Path.cwd()
    if batch is not None:
        rows, base = read_batch(batch), batch.parent
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
            "guidance_scale": float(r.get("guidance_scale", guidance_scale)),
            "negative": r.get("negative", negative),
        }

    for i, row in enumerate(rows):
        folder = out if batch is None else out / f"{i:04d}"
        # a fresh backbone per photo: fine-tuning is per image; sequential edits share it
        bb = load_backbone(
            model,
            device=device,
            dtype=getattr(torch, dtype),
            resolution=resolution,
            offload_text_encoders=offload_text_encoders,
        )
        photo = Path(row["image"]).expanduser()
        photo = photo if photo.is_absolute() else base / photo
        x, exif = load_photo(photo, bb.resolution)
        ed = Editor(bb, x)
        src = row.get("source", source)
        chain = [row] + list(row.get("then", then or []))
        sources = [
            step.get("source", src if j == 0 else chain[j - 1]["target"]) for j, step in enumerate(chain)
        ]
        edits = [(step, src_j, settings(step)) for step, src_j in zip(chain, sources)]
        prompts = [
            p
            for step, src_j, s in edits
            for p in Editor.prompts(src_j, step["target"], s["guidance_scale"], s["negative"])
        ]
        bb.encode_prompts([src, *prompts])  # one text-encoder visit for the row's edits
        if ft.steps:
            bar = tqdm(total=ft.steps, desc=f"fine-tune {photo.name}", leave=False)
            ed.finetune(
                src,
                ft,
                progress=lambda s, loss, bar=bar: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")),
            )
            bar.close()
        for j, (step, src_j, s) in enumerate(edits):
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
