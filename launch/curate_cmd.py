"""``idforge curate``: arguments, progress and the summary table of the curation job."""

from __future__ import annotations

import argparse
import time

import yaml


def add_curate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", required=True, help="image folder (optionally with landmarks.jsonl), .tar, or shards"
    )
    p.add_argument("--output", required=True, help="output folder for shards + manifest.json")
    p.add_argument("--config", default=None, help="YAML with CurateConfig fields (configs/curate/*.yaml)")
    p.add_argument("--detector", choices=["landmarks", "dlib", "insightface"], default=None)
    p.add_argument("--embedder", default=None, help="face-encoder folder, backbone.pth or recognition .onnx")
    p.add_argument("--resolution", type=int, default=None, help="training resolution of the stored crops")
    p.add_argument("--person-folders", action="store_true", help="first sub-folder names the person")
    p.add_argument(
        "--captioner",
        choices=["provided", "celeba", "blip", "lavis"],
        default=None,
        help="caption backend (options via captioner_options in --config)",
    )
    p.add_argument(
        "--cluster",
        choices=["none", "labelled", "unlabelled"],
        default=None,
        help="identity clustering (needs --embedder); report written beside the shards",
    )
    p.add_argument("--workers", type=int, default=None, help="processes for the per-unit stage")
    p.add_argument(
        "--rank", type=int, default=None, help="this worker's index (default: $RANK / SLURM array id)"
    )
    p.add_argument("--world-size", type=int, default=None, help="number of workers (default: $WORLD_SIZE)")


def run_curate_command(args) -> int:
    from idforge.data_pipeline.curate import CurateConfig, run_curation
    from idforge.data_pipeline.sources import open_source
    from tqdm import tqdm

    fields = {}
    if args.config:
        with open(args.config) as f:
            fields = yaml.safe_load(f) or {}
    overrides = {
        "detector": args.detector,
        "embedder": args.embedder,
        "resolution": args.resolution,
        "workers": args.workers,
        "rank": args.rank,
        "world_size": args.world_size,
        "captioner": args.captioner,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if args.person_folders:
        fields["person_folders"] = True
    if args.cluster is not None:
        fields["cluster"] = None if args.cluster == "none" else args.cluster
    cfg = CurateConfig(input=args.input, output=args.output, **fields)
    total = len(open_source(cfg.input, cfg.person_folders))
    t0 = time.perf_counter()
    with tqdm(total=total, unit="img", desc="curate") as bar:
        manifest = run_curation(cfg, progress=bar.update)
    if manifest is None:
        print(
            f"worker {cfg.rank}/{cfg.world_size}: units done; other workers' units pending "
            "(re-run any worker once all finish to write the shards)"
        )
        return 0
    secs = time.perf_counter() - t0
    print(f"\n{'files seen':<24}{manifest['files_seen']:>8}")
    print(f"{'images accepted':<24}{manifest['images_accepted']:>8}")
    for reason, n in manifest["rejected"].items():
        print(f"{'rejected: ' + reason:<24}{n:>8}")
    print(f"{'identities':<24}{sum(manifest['identities'].values()):>8}")
    print(f"{'shards':<24}{len(manifest['shards']):>8}")
    print(f"{total / max(secs, 1e-9):.1f} files/s; manifest: {args.output}/manifest.json")
    if cfg.cluster:
        print(f"identity clustering report: {args.output}/cluster_report_<split>.txt")
    return 0
