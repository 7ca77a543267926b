"""Benchmark: peak memory and time of the curation finalizer against the number of images.

Builds synthetic committed unit folders (the layout the unit stage writes: ``NNNNN.jpg`` crops,
``records.jsonl`` + ``records.idx.npy``, float16 ``emb.npy``, ``unit.json``, and the listing) with
identities of ``--per-identity`` images, then runs the real
:func:`idforge.data_pipeline.finalize.finalize_curation` in a fresh process per size and reports its
peak RSS (``ru_maxrss`` of the child) and wall time. Crops are hard links to one 512 px JPEG per unit,
so the disk holds one image per unit while the finalizer still reads one file per image. Usage::

    python benchmarks/finalize_bench.py --sizes 20000 80000 [--dir /tmp/finalize_bench] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = """
import sys, time, json, resource
import webdataset
from idforge.data_pipeline.job import CurateConfig
from idforge.data_pipeline.finalize import finalize_curation
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cfg = CurateConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
m = finalize_curation(cfg)
print(json.dumps({"import_rss_mb": round(base, 1), "seconds": time.perf_counter() - t, "accepted": m["images_accepted"], "shards": len(m["shards"])}))
"""


def build(root: Path, n: int, per_identity: int, unit_size: int, cfg_kw: dict) -> None:
    from idforge.data_pipeline.job import UNITS, CurateConfig, config_hash
    from PIL import Image

    cfg = CurateConfig(**cfg_kw)
    units = root / UNITS
    units.mkdir(parents=True)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    yy, xx = np.mgrid[:512, :512]
    smooth = np.stack([xx // 2, yy // 2, (xx + yy) // 4], -1) + rng.integers(0, 24, (512, 512, 3))
    Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    jpeg = root / "crop.jpg"
    jpeg.write_bytes(buf.getvalue())
    keys = [f"p{i // per_identity:06d}/{i:08d}.jpg" for i in range(n)]
    stage1 = cfg.stage1()
    (units / "listing.json").write_text(
        json.dumps({"stage1": stage1, "hash": config_hash(stage1), "keys": keys})
    )
    for u, start in enumerate(range(0, n, unit_size)):
        folder = units / f"unit-{u:06d}"
        folder.mkdir()
        lines = []
        shutil.copyfile(jpeg, folder / "00000.jpg")  # one copy per unit (file systems cap links)
        for row, i in enumerate(range(start, min(start + unit_size, n))):
            if row:
                os.link(folder / "00000.jpg", folder / f"{row:05d}.jpg")
            rec = {
                "source": keys[i],
                "identity": f"p{i // per_identity:06d}",
                "labelled": True,
                "split": "train",
                "caption": "a photo of a person.",
                "attributes": {},
                "landmarks": [[200.0, 230.0], [310.0, 230.0], [256.0, 290.0], [210.0, 350.0], [300.0, 350.0]],
                "box": [150.0, 130.0, 360.0, 400.0],
                "score": 0.9,
                "quality": {"face_px": 200.0, "source_size": [1024, 1024]},
            }
            lines.append(json.dumps(rec).encode() + b"\n")
        (folder / "records.jsonl").write_bytes(b"".join(lines))
        np.save(folder / "records.idx.npy", np.cumsum([0] + [len(x) for x in lines]).astype(np.int64))
        emb = rng.standard_normal((len(lines), 512)).astype(np.float32)
        np.save(folder / "emb.npy", (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16))
        (folder / "unit.json").write_text(json.dumps({"n_accepted": len(lines), "rejected": {}, "errors": 0}))


def jpeg_size(root: Path) -> int:
    return (root / "crop.jpg").stat().st_size if (root / "crop.jpg").exists() else 0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    p.add_argument("--per-identity", type=int, default=20)
    p.add_argument("--unit-size", type=int, default=256)
    p.add_argument("--dir", default="/tmp/finalize_bench")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results = {}
    for n in args.sizes:
        root = Path(args.dir) / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        kw = {
            "input": str(Path(args.dir) / "input"),
            "output": str(root),
            "detector": "landmarks",
            "embedder": "bench-arcface.pth",
            "unit_size": args.unit_size,
            "cluster": None,
        }
        t = time.perf_counter()
        build(root, n, args.per_identity, args.unit_size, kw)
        build_s = time.perf_counter() - t
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True, check=True
        ).stdout
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if peak_mb * 1024 <= before:
            raise RuntimeError("peak RSS of an earlier child hides this one; run one size per process")
        res = json.loads(out.strip().splitlines()[-1])
        results[n] = {
            "peak_rss_mb": round(peak_mb, 1),
            **res,
            "build_s": round(build_s, 1),
            "jpeg_bytes": jpeg_size(root),
        }
        print(
            f"n={n:>7} images: finalize peak RSS {peak_mb:7.1f} MB ({res['import_rss_mb']:.0f} MB after "
            f"imports, +{peak_mb - res['import_rss_mb']:.0f} MB), {res['seconds']:6.1f} s "
            f"({n / res['seconds']:.0f} images/s), {res['accepted']} accepted, {res['shards']} shards"
        )
        shutil.rmtree(root, ignore_errors=True)
    print("command: python benchmarks/finalize_bench.py --sizes " + " ".join(map(str, args.sizes)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
