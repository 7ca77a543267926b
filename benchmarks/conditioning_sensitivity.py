"""How much an exported generator listens to its identity and to its caption, at one noise level.

For the first N held-out identities of a demo folder: the UNet's output at timestep T on a fixed
noisy input, with each identity's own reference and caption, then with the identities rolled by
one, the captions rolled by one, and the null identity. Prints the mean |change| of the output
against its mean magnitude (and the same for the context tokens).

    OMP_NUM_THREADS=1 python benchmarks/conditioning_sensitivity.py --model e0/export --demo base
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="an `idforge export` folder")
    ap.add_argument("--demo", type=Path, required=True, help="the demo folder whose held-out shards to use")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--timestep", type=int, default=500)
    args = ap.parse_args()
    from idforge.inference.export import load_pipeline
    from idforge.inference.pipeline import IdentityEmbeds
    from idforge.launch.demo_data import heldout_groups

    pipe = load_pipeline(args.model)
    res = int(pipe.config.resolution)
    groups = heldout_groups(args.demo / "shards", res)[: args.n]
    ids = [pipe.encode_identity(g.images[:1], g.landmarks[:1]) for g in groups]
    arc, clip = torch.cat([e.arcface for e in ids]), torch.cat([e.clip for e in ids])
    text = pipe.encode_text([g.captions[1] for g in groups])
    variants = {
        "own": (IdentityEmbeds(arc, clip), text),
        "identity swapped": (IdentityEmbeds(arc.roll(1, 0), clip.roll(1, 0)), text),
        "caption swapped": (IdentityEmbeds(arc, clip), text.roll(1, 0)),
        "null identity": (IdentityEmbeds(arc * 0, clip * 0), text),
    }
    size = res // pipe.vae_scale_factor
    channels = pipe.unet.config.in_channels
    x = torch.randn(len(groups), channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(groups),), args.timestep)
    outs, ctxs = {}, {}
    for name, (ident, states) in variants.items():
        ctx, tokens = pipe.condition(ident, states)
        kw = {"cross_attention_kwargs": {"id_tokens": tokens}} if tokens is not None else {}
        outs[name] = pipe.unet(x, t, encoder_hidden_states=ctx, **kw).sample
        ctxs[name] = ctx
    base = outs["own"]
    print(
        f"UNet output at t={args.timestep}, {len(groups)} identities: mean |out| {float(base.abs().mean()):.3f}"
    )
    for name in ("identity swapped", "caption swapped", "null identity"):
        d_out = float((outs[name] - base).abs().mean())
        d_ctx = float((ctxs[name] - ctxs["own"]).norm(dim=-1).mean())
        print(f"  {name:<17} mean |change| of the output {d_out:.3f}; of the context per token {d_ctx:.2f}")


if __name__ == "__main__":
    main()
