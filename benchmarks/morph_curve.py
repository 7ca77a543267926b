"""Benchmark: the identity curve of morphing (Diff-ID sec. 3.4) between held-out people of an export.

K pairs of held-out identities (A_k, B_k = identity k and k + 1 of the held-out shards); the first
photo of each is the morph's endpoint, the identity's other photos its gallery. For every frame
a = i / (frames - 1) of ``idforge.inference.morph.morph`` the script reports the mean FS (cosine of
the judge's embeddings, the demo's scorer) of the frame to A's gallery and to B's gallery: FS to A
should fall from A's level to the different-person floor as FS to B rises. For reference it prints
the real photos' FS (same person / different person) and the generation FS of the export on the
same identities (``identity_benchmark``, 1 reference, ``--gen-steps`` DDIM steps, guidance
``--guidance``: the demo's ``fs_adapter``). The judge is ``--judge`` or the export's own face encoder.

    python benchmarks/morph_curve.py --model /tmp/demo_full/export \\
        --shards '/tmp/demo_full/shards/heldout-*.tar' --pairs 20 --frames 8 --steps 25
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by idforge export")
    p.add_argument("--shards", required=True, help="held-out identity shards (glob)")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of inversion and sampling")
    p.add_argument("--strategy", default="full", choices=("full", "embedding", "latent"))
    p.add_argument("--prompt", default="a photo of a face")
    p.add_argument("--judge", default=None, help="face encoder folder (default: the export's)")
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)

    from idforge.data_pipeline.align import template_for
    from idforge.eval.benchmark import identity_benchmark
    from idforge.eval.groups import load_groups
    from idforge.eval.identity import cosine, embed_faces, load_judge
    from idforge.inference.export import load_pipeline
    from idforge.inference.morph import morph

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model)
    res, crop = int(pipe.config.resolution), float(pipe.config.crop_scale)
    judge = load_judge(args.judge)[0] if args.judge else pipe.face_encoder.eval()
    groups = [g for g in load_groups(sorted(glob.glob(args.shards)), res) if g.images.shape[0] >= 2]
    n = min(args.pairs + 1, len(groups))
    if n < 2:
        raise SystemExit(f"{args.shards}: need at least 2 held-out identities with 2 photos each")
    groups = groups[:n]
    lms = torch.as_tensor(template_for(res, crop), dtype=torch.float32)
    gallery = torch.stack(
        [
            torch.nn.functional.normalize(embed_faces(judge, g.images[1:], g.landmarks[1:]).mean(0), dim=-1)
            for g in groups
        ]
    )  # (n, D)
    firsts = torch.stack([g.images[0] for g in groups])
    first_emb = embed_faces(judge, firsts, torch.stack([g.landmarks[0] for g in groups]))
    to_a, to_b = [], []  # (pairs, frames)
    for k in range(n - 1):
        frames = morph(
            pipe,
            firsts[k : k + 1],
            firsts[k + 1 : k + 2],
            args.frames,
            args.strategy,
            args.prompt,
            args.steps,
        )
        emb = embed_faces(judge, frames, lms.expand(frames.shape[0], 5, 2))
        to_a.append(cosine(emb, gallery[k].expand_as(emb)))
        to_b.append(cosine(emb, gallery[k + 1].expand_as(emb)))
        print(f"pair {k + 1}/{n - 1}: FS to A {[round(float(v), 3) for v in to_a[-1]]}", file=sys.stderr)
    to_a, to_b = torch.stack(to_a), torch.stack(to_b)
    mean_a, mean_b = to_a.mean(0), to_b.mean(0)
    monotone = bool((mean_a[1:] <= mean_a[:-1]).all())
    pair_monotone = float((to_a[:, 1:] <= to_a[:, :-1]).all(1).float().mean())
    gen, _ = identity_benchmark(
        pipe, groups, judge, steps=args.gen_steps, guidance_scale=args.guidance, generated_landmarks=lms
    )
    fig = {
        "pairs": n - 1,
        "frames": args.frames,
        "steps": args.steps,
        "strategy": args.strategy,
        "fs_to_a": [round(float(v), 4) for v in mean_a],
        "fs_to_b": [round(float(v), 4) for v in mean_b],
        "fs_to_a_monotone": monotone,
        "pairs_monotone_fraction": pair_monotone,
        "real_same_person": round(float(cosine(first_emb, gallery).mean()), 4),
        "real_different_person": round(float(cosine(first_emb[:-1], gallery[1:]).mean()), 4),
        "generation_fs": round(gen["fs_adapter"], 4),
        "generation_fs_text_only": round(gen["fs_text_only"], 4),
        "identities": n,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("command: python benchmarks/morph_curve.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(
        f"morph {args.strategy}, {n - 1} pairs of held-out identities, {args.frames} frames, {args.steps} steps"
    )
    print("frame a        " + " ".join(f"{i / (args.frames - 1):6.2f}" for i in range(args.frames)))
    print("FS to A        " + " ".join(f"{v:+6.3f}" for v in mean_a.tolist()))
    print("FS to B        " + " ".join(f"{v:+6.3f}" for v in mean_b.tolist()))
    print(f"FS to A falls monotonically (mean curve): {monotone}; per pair: {pair_monotone:.0%}")
    print(
        f"real photos: same person {fig['real_same_person']:+.3f}, different {fig['real_different_person']:+.3f}; "
        f"generation FS {fig['generation_fs']:+.3f} (text-only {fig['generation_fs_text_only']:+.3f}, "
        f"{args.gen_steps} steps, guidance {args.guidance}); {fig['seconds']} s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(fig, f, indent=2)
    return fig


if __name__ == "__main__":
    main()
