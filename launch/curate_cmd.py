"""``idforge curate``: progress and the summary table of the curation job.

The options are :class:`idforge.data_pipeline.curate.CurateConfig`'s fields (``--config`` takes the
same keys as YAML: ``configs/curate/*.yaml``); ``idforge curate --help`` lists them with their docs.
"""

from __future__ import annotations

import time
from pathlib import Path


def curate(config) -> int:
    """Curate raw photos (folders, tars, shards, CelebA / CelebA-HQ, FFHQ) into identity-grouped
    webdataset shards + manifest.json (rejects counted by reason; resumable; --rank/--world_size, $RANK
    or SLURM array ids split the work)."""
    from idforge.data_pipeline.curate import run_curation
    from idforge.data_pipeline.sources import open_source
    from tqdm import tqdm

    cfg = config
    if not Path(cfg.input).exists():
        raise FileNotFoundError(f"--input {cfg.input}: no such file or folder (photos, a .tar or shards)")
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
    print(f"{total / max(secs, 1e-9):.1f} files/s; manifest: {cfg.output}/manifest.json")
    if cfg.cluster:
        print(f"identity clustering report: {cfg.output}/cluster_report_<split>.txt")
    return 0
