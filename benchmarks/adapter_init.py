"""Statistics of the Diff-ID adapter's context at initialisation, at SD1.5 widths (random weights).

    python benchmarks/adapter_init.py [--batch 8] [--text-norm 28]

Prints, per adapter variant, the context's mean, its token-to-token standard deviation (how much the
77 + 4 context tokens differ from each other), the mean token norm, and the share of channels that are
zero for every token and sample (dead under the final ReLU). Text states are random with the norm of
CLIP ViT-L/14 text states (~28); ArcFace embeddings unit-norm; CLIP image embeddings random.
"""

from __future__ import annotations

import argparse

import torch
from idforge.models.adapter import DiffIDAdapter

VARIANTS = {
    "paper (final)": {},
    "paper + normalize_by_length": {"normalize_by_length": True},
    "text_start, no final ReLU": {"text_start": True, "final_activation": False},
}


def stats(opts: dict, batch: int, text_norm: float, seed: int) -> dict:
    torch.manual_seed(seed)
    adapter = DiffIDAdapter(variant="final", arcface_dim=512, clip_dim=1024, text_dim=768, **opts).eval()
    text = torch.randn(batch, 77, 768)
    text = text / text.norm(dim=-1, keepdim=True) * text_norm
    arc = torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1)
    clip = torch.randn(batch, 1024)
    with torch.no_grad():
        ctx = adapter(arc, clip, text).context  # (B, L, 768)
    dead = (ctx == 0).all(dim=1).all(dim=0).float().mean()
    return {
        "mean": float(ctx.mean()),
        "token_std": float(ctx.std(dim=1).mean()),
        "token_norm": float(ctx.norm(dim=-1).mean()),
        "dead": float(dead),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-norm", type=float, default=28.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"{'variant':<30}{'mean':>9}{'token std':>11}{'token norm':>12}{'dead channels':>15}")
    for name, opts in VARIANTS.items():
        s = stats(opts, a.batch, a.text_norm, a.seed)
        print(f"{name:<30}{s['mean']:>9.4f}{s['token_std']:>11.4f}{s['token_norm']:>12.2f}{s['dead']:>14.0%}")
    print(
        f"command: python benchmarks/adapter_init.py --batch {a.batch} --text-norm {a.text_norm} --seed {a.seed}"
    )


if __name__ == "__main__":
    main()
