"""Retrain only the demo's generator on an existing demo folder and score it: the generator's knobs.

``idforge demo`` spends most of its time on the face encoders and the generator; this script reuses a
demo folder's shards, zoo and judge (``idforge demo --out DIR``, any ``--steps``) and trains a new
generator with other settings, so a setting is measured in minutes. It scores held-out identities
(as the demo does) and, with ``--train-identities N``, N training identities the same way: a large
train/held-out difference says the generator memorises the people it saw rather than learning the
embedding -> face map.

    OMP_NUM_THREADS=2 python benchmarks/demo_generator.py --demo demo_out --steps 500 --out gen_a
    OMP_NUM_THREADS=2 python benchmarks/demo_generator.py --demo demo_out --steps 500 \
        --set lr=1e-3 --set 'adapter={"variant": "final", "text_residual": true}' --out gen_b

``--score EXPORT`` skips training and scores an earlier run's export (``--guidance 3 4`` on it).
``--set KEY=VALUE`` overrides a :class:`idforge.launch.demo.DemoConfig` field (VALUE is JSON, or a
plain string). Prints one JSON object (figures, seconds) and writes it to ``OUT/figures.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _corners(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """(N, 3) mean colour of the four k x k corners: the background in SynthID's aligned crops."""
    c = torch.cat([x[..., :k, :k], x[..., :k, -k:], x[..., -k:, :k], x[..., -k:, -k:]], dim=-1)
    return c.flatten(2).mean(-1)


def background_errors(images: dict, groups) -> dict:
    """Does the generator follow the caption? SynthID's captions name each photo's background; the
    mean L1 (in [-1, 1] units) of the generated corners' colour to the captioned photo's, to the
    reference photo's (copied from the identity input), and to another person's captioned photo."""
    captioned = _corners(torch.stack([g.images[1] for g in groups]))
    out = {}
    for name in ("adapter", "text_only"):
        gen = _corners(images[name])
        out[name] = {
            "to_caption": float((gen - captioned).abs().mean()),
            "to_reference": float((gen - _corners(images["reference"])).abs().mean()),
            "to_other_caption": float((gen - captioned.roll(1, 0)).abs().mean()),
        }
    return out


def _grid(images: dict, groups, path: Path, n: int = 8) -> None:
    """Rows: identities; columns: reference | the captioned photo | adapter | text-only (4x nearest)."""
    from torchvision.utils import save_image

    cols = [images["reference"][:n], torch.stack([g.images[1] for g in groups[:n]])]
    cols += [images["adapter"][:n], images["text_only"][:n]]
    grid = torch.stack(cols, dim=1).flatten(0, 1)
    scale = max(1, 64 // grid.shape[-1])
    save_image(torch.nn.functional.interpolate((grid + 1) / 2, scale_factor=scale), path, nrow=4, padding=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="an idforge demo folder (shards/, zoo/, judge/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="DemoConfig.quick() as the base")
    ap.add_argument("--train-identities", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    ap.add_argument("--score", type=Path, default=None, help="score this export instead of training one")
    ap.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=None,
        help="identity guidance scales to score (default: the config's)",
    )
    args = ap.parse_args()

    from idforge.data_pipeline.align import template_for
    from idforge.eval.benchmark import identity_benchmark
    from idforge.eval.groups import load_groups
    from idforge.inference.export import export_generator, load_pipeline
    from idforge.launch.demo import DemoConfig
    from idforge.launch.demo_data import heldout_groups
    from idforge.launch.demo_train import train_generator, zoo_config
    from idforge.models.face.face_encoder import FaceEncoder
    from idforge.models.zoo import build_tiny

    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = DemoConfig.quick() if args.quick else DemoConfig()
    cfg = replace(base, steps=args.steps, **parse_set(args.set))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()

    final_loss = None
    if args.score is not None:  # an earlier run's export, scored again (e.g. at other guidance scales)
        pipe, t_train = load_pipeline(args.score), 0.0
    else:
        zoo = build_tiny(out / "zoo", zoo_config(cfg))
        for part in ("face_encoder", "vae"):  # the demo's trained encoder (and VAE), not random ones
            if (demo / "zoo" / part).exists():
                shutil.rmtree(out / "zoo" / part, ignore_errors=True)
                shutil.copytree(demo / "zoo" / part, out / "zoo" / part)
        module, trainer = train_generator(cfg, zoo, demo / "shards", out, progress_bar=False)
        t_train = time.perf_counter() - t0
        final_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
        pipe = load_pipeline(export_generator(module.model, out / "export", cfg.resolution))
    judge = FaceEncoder.from_pretrained(demo / "judge")
    lms = torch.as_tensor(template_for(cfg.resolution, cfg.crop_scale), dtype=torch.float32)
    train_urls = sorted(str(p) for p in (demo / "shards").glob("train-*.tar"))
    sets = {"heldout": heldout_groups(demo / "shards", cfg.resolution)}
    if args.train_identities > 0:
        sets["train"] = load_groups(train_urls, cfg.resolution, max_identities=args.train_identities)
    figures = {}
    runs = [(name, w) for w in (args.guidance or [cfg.guidance_scale]) for name in sets]
    for name, w in runs:
        groups = [g for g in sets[name] if g.images.shape[0] > 1]
        fig, images = identity_benchmark(
            pipe,
            groups,
            pipe.face_encoder,
            steps=cfg.sampling_steps,
            guidance_scale=w,
            seed=cfg.seed,
            generated_landmarks=lms,
            judges={"judge": judge},
        )
        name = f"{name}@{w:g}"
        _grid(images, groups, out / f"grid_{name}.png")
        figures[name] = {
            enc: {
                "fs_adapter": f["fs_adapter"],
                "fs_text_only": f["fs_text_only"],
                "gap": f["fs_adapter"] - f["fs_text_only"],
                "top1": f["identification"]["adapter"]["top1"],
                "top5": f["identification"]["adapter"]["top5"],
                "ceiling": f["fs_same_identity"],
                "floor": f["fs_different"],
            }
            for enc, f in (("encoder", fig), ("judge", fig["judges"]["judge"]))
        }
        figures[name]["identities"] = len(groups)
        figures[name]["background"] = background_errors(images, groups)
    result = {
        "overrides": parse_set(args.set),
        "steps": None if args.score is not None else cfg.steps,
        "final_loss": final_loss,
        "scored_export": None if args.score is None else str(args.score),
        "train_seconds": round(t_train, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "figures": figures,
    }
    (out / "figures.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
