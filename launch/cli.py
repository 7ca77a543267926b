"""The ``idforge`` command: one entry point, a subcommand per job.

    idforge demo      [--out DIR] [--quick]          whole flow on SynthID + tiny models (CPU, offline)
    idforge curate    --input PATH --output DIR      raw photos -> identity-grouped webdataset shards
    idforge caption-finetune --model BLIP --data JSONL --out DIR   BLIP fine-tuned on attribute captions
    idforge cache     --shards DIR --out DIR --base SD   shards + cached VAE latents and CLIP text states
    idforge train     fit --config YAML              LightningCLI (fit / validate / test)
    idforge export    --checkpoint CKPT --out DIR    Lightning checkpoint -> self-contained folder
    idforge generate  --model DIR --reference IMG    images of the reference's identity
    idforge eval      --model DIR --shards GLOB      held-out FS table of an exported model

Only this package prints; library code logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _demo(args) -> int:
    from .demo import DemoConfig, format_table, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.seed is not None:
        cfg.seed = args.seed
    if args.steps is not None:
        cfg.steps = args.steps
    if args.identity_loss is not None:
        cfg.identity_loss = args.identity_loss
    print(f"idforge demo -> {args.out}  ({'quick' if args.quick else 'full'} run, CPU, offline)", flush=True)
    fig = run_demo(args.out, cfg, report=lambda m: print(m, flush=True))
    print()
    print(format_table(fig))
    print(
        f"\nsteps {fig['steps']}, {fig['seconds']:.0f} s in total; wrote {Path(args.out) / 'demo.json'} and "
        f"{Path(args.out) / 'demo_grid.png'} (rows: reference | adapter | text-only)"
    )
    return 0


def _curate(args) -> int:
    from .curate_cmd import run_curate_command

    return run_curate_command(args)


def _caption_finetune(args) -> int:
    from idforge.data_pipeline.caption_finetune import run_from_args

    out, history = run_from_args(args)
    losses = history.get("loss") or []
    tail = f", final loss {losses[-1]:.4f}" if losses else ""
    print(f"fine-tuned captioner written to {out}{tail}; use it with caption backend 'blip' and model={out}")
    return 0


def _cache(args) -> int:
    from idforge.data_pipeline.cache import cache_shards

    summary = cache_shards(
        args.shards,
        args.out,
        {"base": args.base},
        args.resolution,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        progress=lambda name: print(f"cached {name}", flush=True),
    )
    print(
        f"{summary['images_encoded']} images encoded into {len(summary['shards'])} shards in {args.out} "
        f"({len(summary['skipped_existing'])} already cached); train with --data.train_shards pointing there"
    )
    return 0


def _export(args) -> int:
    from .export_cmd import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, resolution=args.resolution)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def _generate(args) -> int:
    from .generate_cmd import run_generate

    paths = run_generate(args)
    for p in paths:
        print(p)
    return 0


def _eval(args) -> int:
    from .eval_cmd import run_eval

    fig = run_eval(args)
    print(json.dumps(fig, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idforge", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the end-to-end demo on SynthID with tiny models")
    d.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    d.add_argument("--quick", action="store_true", help="a much shorter run (for tests and smoke checks)")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument(
        "--steps", type=int, default=None, help="generator training steps (default: 500, quick: 4)"
    )
    d.add_argument(
        "--identity-loss",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="train with the time-weighted ArcFace identity loss at this weight (default: off)",
    )
    d.set_defaults(func=_demo)

    c = sub.add_parser("curate", help="curate raw photos into identity-grouped webdataset shards")
    from .curate_cmd import add_curate_arguments

    add_curate_arguments(c)
    c.set_defaults(func=_curate)

    f = sub.add_parser("caption-finetune", help="fine-tune BLIP on attribute captions (Diff-ID's captioner)")
    from idforge.data_pipeline.caption_finetune import add_arguments

    add_arguments(f)
    f.set_defaults(func=_caption_finetune)

    k = sub.add_parser("cache", help="add cached VAE latents and CLIP text states to curated shards")
    k.add_argument("--shards", required=True, help="folder of shards written by `idforge curate`")
    k.add_argument("--out", required=True, help="output folder for the cached copies (resumable)")
    k.add_argument(
        "--base",
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="diffusers folder or hub name holding vae/, text_encoder/, tokenizer/ (or tiny:/folder)",
    )
    k.add_argument("--resolution", type=int, required=True, help="training resolution the latents are for")
    k.add_argument("--device", default="cpu")
    k.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    k.add_argument("--batch-size", type=int, default=16)
    k.set_defaults(func=_cache)

    sub.add_parser(
        "train", help="LightningCLI: idforge train fit --config configs/train/tiny.yaml", add_help=False
    )

    e = sub.add_parser("export", help="export a training checkpoint to a self-contained model folder")
    e.add_argument("--checkpoint", required=True, help="Lightning .ckpt written by `idforge train fit`")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument(
        "--resolution", type=int, default=None, help="generation resolution (default: from the data)"
    )
    e.set_defaults(func=_export)

    g = sub.add_parser("generate", help="generate images of a reference face's identity")
    g.add_argument("--model", required=True, help="folder written by `idforge export` (or `idforge demo`)")
    g.add_argument("--reference", required=True, help="reference face image")
    g.add_argument(
        "--landmarks",
        default=None,
        help="5 landmarks of the reference as JSON [[x,y]*5]; default: the image is already an "
        "aligned crop at the model's template",
    )
    g.add_argument("--prompt", action="append", required=True, help="caption; repeat for several images")
    g.add_argument("--out", required=True, help="output folder for PNGs")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=_generate)

    v = sub.add_parser("eval", help="FS table of an exported model on held-out identity shards")
    v.add_argument("--model", required=True, help="folder written by `idforge export`")
    v.add_argument("--shards", required=True, help="held-out shards (glob or brace pattern)")
    v.add_argument("--steps", type=int, default=50, help="DDIM steps")
    v.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale against the null identity (the demo uses 2.0)",
    )
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--max-identities", type=int, default=200)
    v.add_argument("--out", default=None, help="write the figures as JSON here")
    v.set_defaults(func=_eval)
    return p


def _quiet_libraries() -> None:
    """Keep the command's output to idforge's own report (use -v for the libraries' logs)."""
    import warnings

    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: quiet them after it)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-v" not in argv and "--verbose" not in argv:
        _quiet_libraries()
    if argv and argv[0] == "train":
        from .train_cmd import run_train

        run_train(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
