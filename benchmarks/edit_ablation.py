"""Edit ablation on SynthID (FlowID paper 000 / FINEdits paper 002): mask and fine-tuning vs identity.

A hair-colour (or, ``--attribute background``, background-colour) edit of K held-out SynthID photos with an exported identity model, four variants:

    full        attention mask + single-image fine-tuning (Algorithm 1)
    no_mask     fine-tuning, no mask (the whole latent follows the target prompt)
    no_finetune mask, no fine-tuning
    neither     no mask, no fine-tuning

Source prompt = the photo's SynthID caption ("... and red short hair, ..."); target = the same
caption with the hair colour replaced by the colour farthest from it in RGB; concept = the source's
hair words (mask from the inversion pass, FINEdits' removal mode; preset ``hair_color``).

FS = cosine of face-encoder embeddings (``--judge``, default the export's own face encoder) of the
edited photo and the original, both aligned with the original's landmarks; ``fs_gallery`` is the
cosine to the mean embedding of the person's other photos (FlowID's InjuredFaces protocol).
Attribute change, measured on the rendered colours: the pixels of the original within
``--hair-tol`` of the source hair RGB are its hair; an edit changed the attribute when their mean
colour in the edited image is closer to the target hair RGB than to the source's.

    python benchmarks/edit_ablation.py --demo /tmp/demo_full --k 8 --json edit_ablation.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

VARIANTS = {  # name: (mask, fine-tune)
    "full": (True, True),
    "no_mask": (False, True),
    "no_finetune": (True, False),
    "neither": (False, False),
}
HAIR_RE = re.compile(r"\b(\w+) (short|long|fringe|bun|curly) hair\b")


def hair_edit(caption: str) -> tuple[str, str, str, str] | None:
    """(target caption, concept, source colour, target colour), or None when no hair colour is named."""
    from idforge.data_pipeline.synthid import HAIR

    m = HAIR_RE.search(caption)
    if m is None or m.group(1) not in HAIR:
        return None
    src = m.group(1)
    rgb = torch.tensor(HAIR[src], dtype=torch.float32)
    tgt = max(HAIR, key=lambda c: float((torch.tensor(HAIR[c], dtype=torch.float32) - rgb).norm()))
    target = caption[: m.start()] + f"{tgt} {m.group(2)} hair" + caption[m.end() :]
    return target, m.group(0), src, tgt


BACKGROUND_RE = re.compile(r"\bon a (\w+) (plain|gradient|striped) background\b")


def background_edit(caption: str) -> tuple[str, str, str, str] | None:
    """As :func:`hair_edit` for the photo's background colour, which SynthID draws per photo (the
    identity input does not carry it, the caption does); None for noisy backgrounds (no colour)."""
    from idforge.data_pipeline.synthid import BACKGROUND

    m = BACKGROUND_RE.search(caption)
    if m is None or m.group(1) not in BACKGROUND:
        return None
    src = m.group(1)
    rgb = torch.tensor(BACKGROUND[src], dtype=torch.float32)
    tgt = max(
        BACKGROUND, key=lambda c: float((torch.tensor(BACKGROUND[c], dtype=torch.float32) - rgb).norm())
    )
    target = caption[: m.start()] + f"on a {tgt} {m.group(2)} background" + caption[m.end() :]
    return target, f"{src} {m.group(2)} background", src, tgt


ATTRIBUTES = {"hair": hair_edit, "background": background_edit}


def hair_change(
    original: torch.Tensor, edited: torch.Tensor, src: str, tgt: str, tol: float, attribute: str = "hair"
):
    """(changed?, attribute pixels) from the mean colour of the original's pixels of the source
    colour (hair or background; images in [-1, 1])."""
    from idforge.data_pipeline.synthid import BACKGROUND, HAIR

    palette = HAIR if attribute == "hair" else BACKGROUND
    o, e = ((t.clamp(-1, 1) + 1) * 127.5 for t in (original, edited))  # (3, H, W) in 0..255
    s_rgb = torch.tensor(palette[src], dtype=torch.float32).view(3, 1, 1)
    t_rgb = torch.tensor(palette[tgt], dtype=torch.float32).view(3, 1, 1)
    hair = (o - s_rgb).norm(dim=0) < tol  # (H, W)
    if int(hair.sum()) < 3:
        return None, int(hair.sum())
    mean = e[:, hair].mean(1).view(3, 1, 1)
    return bool((mean - t_rgb).norm() < (mean - s_rgb).norm()), int(hair.sum())


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, help="an `idforge demo` output folder (export/ and shards/)")
    ap.add_argument("--model", type=Path, help="an `idforge export` folder (default DEMO/export)")
    ap.add_argument("--heldout", type=Path, nargs="*", help="held-out shards (default DEMO/shards/heldout-*)")
    ap.add_argument("--judge", type=Path, help="face-encoder folder for FS (default: the export's)")
    ap.add_argument("--k", type=int, default=8, help="held-out photos edited (one per identity)")
    ap.add_argument("--steps", type=int, default=20, help="steps of a full 0 -> 1 schedule")
    ap.add_argument("--finetune-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--grad-accum", type=int, default=10)
    ap.add_argument("--preset", default="hair_color")
    ap.add_argument("--mask-at", type=float, default=0.5)
    ap.add_argument("--hair-tol", type=float, default=40.0, help="RGB distance to the source colour")
    ap.add_argument("--attribute", choices=sorted(ATTRIBUTES), default="hair", help="what the edit recolours")
    ap.add_argument("--guidance", type=float, default=1.0, help="guidance of the editing pass (1: none)")
    ap.add_argument("--negative", default=None, help="its negative prompt (default: the source caption)")
    ap.add_argument("--json", type=Path, default=Path("edit_ablation.json"))
    args = ap.parse_args(argv)
    from idforge.eval.groups import load_groups
    from idforge.eval.identity import cosine, embed_faces, load_judge
    from idforge.inference.edit import PRESETS, Editor, FinetuneConfig, load_backbone

    model = args.model or (args.demo / "export" if args.demo else None)
    shards = args.heldout or (sorted((args.demo / "shards").glob("heldout-*.tar")) if args.demo else [])
    if model is None or not shards:
        ap.error("give --demo DIR, or --model and --heldout")
    t0 = time.perf_counter()
    bb = load_backbone(model)
    judge = load_judge(args.judge)[0] if args.judge else bb.pipe.face_encoder
    groups = load_groups([str(p) for p in shards], bb.resolution)
    jobs = [(g, e) for g in groups if (e := ATTRIBUTES[args.attribute](g.captions[0])) is not None][: args.k]
    preset = PRESETS[args.preset]
    base = copy.deepcopy(bb.denoiser.state_dict())
    ft = FinetuneConfig(steps=args.finetune_steps, lr=args.lr, grad_accum=args.grad_accum)
    records = []
    for g, (target, concept, src, tgt) in jobs:
        bb.denoiser.load_state_dict(base)
        x, lms = g.images[:1], g.landmarks[:1]
        ed = Editor(bb, x)
        rec = {"identity": g.identity, "source": g.captions[0], "target": target, "concept": concept}
        for tuned in (False, True):
            if tuned:
                ed.finetune(g.captions[0], ft)
            for name, (masked, ft_on) in VARIANTS.items():
                if ft_on != tuned:
                    continue
                res = ed.edit(g.captions[0], target, concept if masked else None, strength=preset.strength,
                              steps=args.steps, kernel=preset.kernel, mask_at=args.mask_at,
                              guidance_scale=args.guidance, negative=args.negative)  # fmt: skip
                emb = embed_faces(judge, torch.cat([x, res.image]), torch.cat([lms, lms]))
                gallery = embed_faces(judge, g.images[1:], g.landmarks[1:]).mean(0, keepdim=True)
                changed, n_hair = hair_change(x[0], res.image[0], src, tgt, args.hair_tol, args.attribute)
                rec[name] = {
                    "fs": float(cosine(emb[1:], emb[:1])),
                    "fs_gallery": float(cosine(emb[1:], gallery)),
                    "changed": changed,
                    "hair_px": n_hair,
                    "mask_area": None if res.mask is None else float(res.mask.mean()),
                    "l1": float((res.image - x).abs().mean()),
                }
        records.append(rec)
    summary = {}
    everywhere = [r for r in records if all(r[name]["changed"] for name in VARIANTS)]
    for name in VARIANTS:
        rows = [r[name] for r in records]
        won = [r for r in rows if r["changed"]]
        measured = [r["changed"] for r in rows if r["changed"] is not None]
        summary[name] = {
            "fs": sum(r["fs"] for r in rows) / len(rows),
            "fs_gallery": sum(r["fs_gallery"] for r in rows) / len(rows),
            "l1": sum(r["l1"] for r in rows) / len(rows),
            "changed": f"{sum(measured)}/{len(measured)}",
            # the protocols' figure: identity over successful edits (each variant's own, and the
            # edits every variant got right, so the four are compared on the same photos)
            "fs_gallery_successful": _mean([r["fs_gallery"] for r in won]),
            "fs_gallery_all_successful": _mean([r[name]["fs_gallery"] for r in everywhere]),
            "all_successful": len(everywhere),
            "mask_area": None
            if rows[0]["mask_area"] is None
            else sum(r["mask_area"] for r in rows) / len(rows),
        }
    seconds = time.perf_counter() - t0
    out = {"command": "python " + " ".join(sys.argv), "model": str(model), "k": len(records),
           "steps": args.steps, "finetune_steps": args.finetune_steps, "lr": args.lr,
           "grad_accum": args.grad_accum, "guidance": args.guidance, "negative": args.negative, "preset": args.preset, "attribute": args.attribute, "seconds": round(seconds, 1),
           "summary": summary, "edits": records}  # fmt: skip
    args.json.write_text(json.dumps(out, indent=2))
    print(f"command: {out['command']}")
    print(f"{len(records)} held-out SynthID photos, {args.attribute}-colour edit ({args.preset}: strength {preset.strength}, "
          f"kernel {preset.kernel}), {args.steps}-step schedule, fine-tune {args.finetune_steps} x "
          f"{args.grad_accum} at lr {args.lr}, guidance {args.guidance:g}; {seconds:.0f} s")  # fmt: skip
    print(
        f"{'variant':<12} {'mask':<5} {'tune':<5} {'FS(orig)':>8} {'FS(gal)':>8} {'L1':>6} {'changed':>8} {'mask':>5}"
        f" {'FS(gal) ok':>10} {'FS(gal) all ok':>14}"
    )
    for name, (masked, tuned) in VARIANTS.items():
        s = summary[name]
        area = "-" if s["mask_area"] is None else f"{s['mask_area']:.2f}"
        ok, all_ok = (("-" if v is None else f"{v:.3f}") for v in
                      (s["fs_gallery_successful"], s["fs_gallery_all_successful"]))  # fmt: skip
        print(f"{name:<12} {masked!s:<5} {tuned!s:<5} {s['fs']:8.3f} {s['fs_gallery']:8.3f} {s['l1']:6.3f} "
              f"{s['changed']:>8} {area:>5} {ok:>10} {all_ok:>14}")  # fmt: skip
    print(f"all ok: the {len(everywhere)} edits every variant changed")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
