"""Benchmark: identity clustering at scale on synthetic ArcFace-like embeddings (not a test).

N unit 512-d embeddings of known identities: identity centres drawn at random on the sphere (two
centres have cosine ~N(0, 0.044)), each image = centre + Gaussian noise with a per-identity level
chosen so same-person cosines fall between ~0.6 and ~0.8 (ArcFace's range for one person). Identity
sizes are uniform in [2, 2 * per - 2]. Prints wall time, peak resident memory (getrusage) and the
adjusted Rand index against the truth (dropped images count as one extra "dropped" label), and the
command line. Usage::

    python benchmarks/cluster_bench.py --n 100000
    python benchmarks/cluster_bench.py --n 1000000 --k 32 --threshold 0.5
    python benchmarks/cluster_bench.py --n 100000 --mode labelled   # FlashFace per-person cleaning
"""

from __future__ import annotations

import argparse
import logging
import resource
import shlex
import sys
import time

import numpy as np


def synthetic(n: int, per: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, max(3, 2 * per - 1), size=n // 2 + 1)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    n_id = int(labels.max()) + 1
    centres = rng.standard_normal((n_id, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # same-person cosine ~ 1 / (1 + s^2): s in [0.5, 0.8] -> cos ~0.8 .. ~0.6
    noise = rng.uniform(0.5, 0.8, size=n_id).astype(np.float32)
    emb = np.empty((n, dim), np.float32)
    for a in range(0, n, 65536):
        lab = labels[a : a + 65536]
        g = rng.standard_normal((len(lab), dim), dtype=np.float32) / np.sqrt(dim)
        x = centres[lab] + noise[lab, None] * g
        emb[a : a + 65536] = x / np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return emb[perm], labels[perm]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--per", type=int, default=10, help="mean images per identity")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--mode", choices=("unlabelled", "labelled"), default="unlabelled")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--no-refine", action="store_true")
    p.add_argument("--intruders", type=float, default=0.05, help="labelled mode: share of wrong labels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from idforge.data_pipeline.cluster import cluster_labelled, cluster_unlabelled
    from sklearn.metrics import adjusted_rand_score

    t0 = time.perf_counter()
    emb, truth = synthetic(args.n, args.per, args.dim, args.seed)
    t_gen = time.perf_counter() - t0
    same = emb[:2000] @ emb[:2000].T
    pair = truth[:2000, None] == truth[None, :2000]
    np.fill_diagonal(pair, False)
    print(
        f"data: {args.n} embeddings, {truth.max() + 1} identities, same-person cos mean "
        f"{same[pair].mean():.3f} (p5 {np.percentile(same[pair], 5):.3f}), different max "
        f"{same[~pair & ~np.eye(len(same), dtype=bool)].max():.3f}; generated in {t_gen:.1f} s"
    )
    t0 = time.perf_counter()
    if args.mode == "unlabelled":
        r = cluster_unlabelled(
            emb,
            threshold=args.threshold,
            refine=not args.no_refine,
            k=args.k,
            nprobe=args.nprobe,
            device=args.device,
            seed=args.seed,
        )
        scored = truth
    else:
        rng = np.random.default_rng(args.seed + 1)
        noisy = truth.copy()
        bad = rng.random(args.n) < args.intruders
        noisy[bad] = rng.integers(0, truth.max() + 1, int(bad.sum()))
        r = cluster_labelled(emb, noisy, k=3, min_similarity=0.6, seed=args.seed)
        scored = truth
        print(f"intruders: {int(bad.sum())}, of which kept {int(r.keep[bad].sum())}")
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ari_all = adjusted_rand_score(scored, r.identity)
    ari_kept = adjusted_rand_score(scored[r.keep], r.identity[r.keep])
    rep = r.report
    print(
        f"{args.mode}: {seconds:.1f} s, peak RSS {peak_gib:.2f} GiB, ARI {ari_all:.4f} (kept only "
        f"{ari_kept:.4f}), {rep['clusters']} clusters for {truth.max() + 1} identities, "
        f"{rep['kept']} kept / {rep['dropped']} dropped"
        + (
            f", index {rep['index']}, {rep['suspect_components']} suspects, {rep['splits']} splits"
            if "index" in rep
            else ""
        )
    )
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))


if __name__ == "__main__":
    main()
