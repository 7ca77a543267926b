"""``idforge curate``: progress and the summary table of the curation job.

The options are :class:`idforge.data_pipeline.curate.CurateConfig`'s fields (``--config`` takes the
same keys as YAML: ``configs/curate/*.yaml``); ``idforge curate --help`` lists them with their docs.
"""

from __future__ import annotations

import time
from pathlib import Path


def _summary(manifest: dict, output: str, seconds: float | None = None) -> None:
    print(f"\n{'files seen':<24}{manifest['files_seen']:>8}")
    print(f"{'images accepted':<24}{manifest['images_accepted']:>8}")
    rejected = {reason: n for reason, n in manifest["rejected"].items() if n}
    for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1]):
        print(f"{'rejected: ' + reason:<24}{n:>8}")
    if not rejected:
        print(f"{'rejected':<24}{0:>8}")
    print(f"{'identities':<24}{sum(manifest['identities'].values()):>8}")
    print(f"{'shards':<24}{len(manifest['shards']):>8}")
    rate = f"{manifest['files_seen'] / max(seconds, 1e-9):.1f} files/s; " if seconds else ""
    print(f"{rate}manifest: {output}/manifest.json")
    for report in sorted(Path(output).glob("cluster_report_*.txt")):
        print(f"identity clustering report: {report}")
    why = manifest.get("why_nothing_accepted")
    if why:
        print(f"\nwarning: {why}")


def curate(config) -> int:
    """Curate raw photos (folders, tars, shards, CelebA / CelebA-HQ, FFHQ) into identity-grouped
    webdataset shards + manifest.json (rejects counted by reason; resumable; --rank/--world_size, $RANK
    or SLURM array ids split the work; rank 0 writes the shards once every unit is done)."""
    from idforge.data_pipeline.curate import run_curation
    from tqdm import tqdm

    cfg = config
    if not Path(cfg.input).exists():
        raise FileNotFoundError(f"--input {cfg.input}: no such file or folder (photos, a .tar or shards)")
    t0 = time.perf_counter()
    with tqdm(unit="img", desc="curate") as bar:

        def set_total(n: int) -> None:  # the job lists the input once; the bar learns its size from it
            bar.total = n
            bar.refresh()

        manifest = run_curation(cfg, progress=bar.update, on_total=set_total)
    if manifest is None:
        print(
            "this worker's units are done; rank 0 writes the shards once every worker's units are committed "
            "(or run `idforge curate-finalize` with the same options then)"
        )
        return 0
    _summary(manifest, cfg.output, time.perf_counter() - t0)
    return 0


def finalize(config) -> int:
    """Write the shards and manifest.json of a curation whose units are all committed (the single
    finalizer: safe to start on several nodes, one writes and the others wait for its result)."""
    from idforge.data_pipeline.finalize import finalize_curation

    manifest = finalize_curation(config)
    _summary(manifest, config.output)
    return 0
