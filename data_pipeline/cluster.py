"""Identity clustering of ArcFace embeddings (curation stage "cluster"), two modes.

(a) :func:`cluster_labelled`: sources with person labels that may be noisy (FlashFace sec. 3.1):
    per person, spherical k-means (k = 3, or chosen by silhouette with ``k="auto"``); the centre of
    the largest cluster is the person's indicator; images in the other clusters, and images whose
    cosine to the indicator is below ``min_similarity`` (0.6), are dropped.
(b) :func:`cluster_unlabelled`: no labels. A graph with an edge between every pair of cosine >=
    ``threshold``; identities are its connected components (single linkage). Pairs are found block
    by block with chunked matrix products (memory O(chunk^2), never N x N); each block's edges are
    reduced at once to a spanning star per local component (scipy csgraph, no Python loop over
    edges), and the stored star edges are compacted whenever they exceed 4 N, so edge memory stays
    O(N). Scales to millions of embeddings (time O(N^2 D): pass ``device="cuda"`` for the products).

    Chaining risk: single linkage merges two identities when a chain of images links them, each
    step above the threshold (look-alikes, blurred or mislabelled images, relatives). ``refine=True``
    runs a centroid-refinement pass: each component is split by spherical 2-means, recursively,
    while the two halves' centres have cosine below ``threshold`` (a chain joins two groups whose
    centres are far apart; one identity's halves stay close); then every image is reassigned to its
    nearest centre, and images below ``threshold`` to every centre are dropped as outliers.

:func:`write_report` writes ``<path>.json`` + ``<path>.txt``: cluster sizes and histograms of
within-cluster (image to its centre) and between-cluster (centre to centre) cosines.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
HIST_BINS = np.linspace(-1.0, 1.0, 41)


@dataclass
class ClusterResult:
    identity: np.ndarray  # (N,) int, -1 = dropped
    keep: np.ndarray  # (N,) bool
    centres: dict = field(default_factory=dict)  # identity id -> (D,) unit centre
    report: dict = field(default_factory=dict)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _check(embeddings: np.ndarray) -> np.ndarray:
    e = np.asarray(embeddings)
    if e.ndim != 2 or len(e) == 0:
        raise ValueError(f"clustering expects (N, D) embeddings with N >= 1, got shape {e.shape}")
    return _unit(e)


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """k-means on the unit sphere (cosine), k-means++ seeding; returns (labels (N,), centres (k, D))."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = max(1, min(k, n))
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: sample far points
        p = (1.0 - np.max(x @ np.stack(centres).T, axis=1)).clip(0) ** 2
        centres.append(x[rng.choice(n, p=p / p.sum())] if p.sum() > 0 else x[rng.integers(n)])
    c = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for it in range(iters):
        new = np.argmax(x @ c.T, axis=1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = _unit(members.mean(0))
    return labels, c


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean cosine-distance silhouette (per-person sets are small)."""
    ids = np.unique(labels)
    if len(ids) < 2:
        return -1.0
    d = 1.0 - x @ x.T
    s = []
    for i in range(len(x)):
        same = labels == labels[i]
        if same.sum() < 2:
            s.append(0.0)
            continue
        a = d[i, same].sum() / (same.sum() - 1)
        b = min(d[i, labels == j].mean() for j in ids if j != labels[i])
        s.append((b - a) / max(a, b, 1e-12))
    return float(np.mean(s))


def _choose_k(x: np.ndarray, seed: int, max_k: int = 5, min_silhouette: float = 0.25) -> int:
    best_k, best = 1, min_silhouette
    for k in range(2, min(max_k, len(x) - 1) + 1):
        s = _silhouette(x, spherical_kmeans(x, k, seed)[0])
        if s > best:
            best_k, best = k, s
    return best_k


def _hist(values: np.ndarray) -> dict:
    counts, _ = np.histogram(np.asarray(values, dtype=np.float64), bins=HIST_BINS)
    return {
        "bins": HIST_BINS.round(3).tolist(),
        "counts": counts.tolist(),
        "mean": float(np.mean(values)) if len(values) else None,
    }


def _between(centres: np.ndarray, max_centres: int = 4096, seed: int = 0) -> np.ndarray:
    """Off-diagonal centre-centre cosines (a random subset of centres when there are many)."""
    if len(centres) < 2:
        return np.zeros(0, np.float32)
    if len(centres) > max_centres:
        centres = centres[np.random.default_rng(seed).choice(len(centres), max_centres, replace=False)]
    return (centres @ centres.T)[np.triu_indices(len(centres), 1)]


def _sizes(identity: np.ndarray) -> np.ndarray:
    kept = identity[identity >= 0]
    return np.bincount(kept) if len(kept) else np.zeros(0, np.int64)


def _common_report(identity: np.ndarray, within: np.ndarray, centres: np.ndarray, seed: int) -> dict:
    sizes = _sizes(identity)
    sizes = sizes[sizes > 0]
    return {
        "images": len(identity),
        "kept": int((identity >= 0).sum()),
        "dropped": int((identity < 0).sum()),
        "clusters": len(sizes),
        "cluster_sizes": sorted(sizes.tolist(), reverse=True)[:1000],
        "size_histogram": {str(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True))},
        "within_similarity": _hist(within),
        "between_similarity": _hist(_between(centres, seed=seed)),
    }


def cluster_labelled(
    embeddings: np.ndarray, person_labels, k: int | str = 3, min_similarity: float = 0.6, seed: int = 0
) -> ClusterResult:
    """FlashFace's per-person cleaning; ``identity`` = index of the person in sorted label order."""
    e = _check(embeddings)
    labels = np.asarray(person_labels)
    if len(labels) != len(e):
        raise ValueError(f"{len(e)} embeddings but {len(labels)} person labels")
    if k != "auto" and (isinstance(k, str) or int(k) < 1):
        raise ValueError(f"k must be a positive int or 'auto', got {k!r}")
    persons, inverse = np.unique(labels, return_inverse=True)
    identity = np.full(len(e), -1, dtype=np.int64)
    centres, per_person, within = {}, {}, []
    for pid in range(len(persons)):
        idx = np.flatnonzero(inverse == pid)
        x = e[idx]
        assign, c = spherical_kmeans(x, _choose_k(x, seed) if k == "auto" else int(k), seed)
        sizes = np.bincount(assign, minlength=len(c))
        largest = int(np.argmax(sizes))
        sims = x @ c[largest]  # cosine to the indicator (centre of the largest cluster)
        ok = (assign == largest) & (sims >= min_similarity)
        identity[idx[ok]] = pid
        centres[pid] = c[largest]
        within.append(sims[ok])
        per_person[str(persons[pid])] = {
            "id": pid,
            "images": len(idx),
            "kept": int(ok.sum()),
            "k": len(c),
            "cluster_sizes": sorted(sizes.tolist(), reverse=True),
        }
    report = {
        "mode": "labelled",
        "k": k,
        "min_similarity": min_similarity,
        "persons": len(persons),
        **_common_report(identity, np.concatenate(within), np.stack(list(centres.values())), seed),
        "per_person": per_person,
    }
    return ClusterResult(identity=identity, keep=identity >= 0, centres=centres, report=report)


def _matmul(device: str):
    if device == "cpu":
        return lambda a, b: a @ b.T
    import torch

    def mm(a, b):
        return (torch.from_numpy(a).to(device) @ torch.from_numpy(b).to(device).T).float().cpu().numpy()

    return mm


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _star(nodes: np.ndarray, comp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges linking every node to the first node of its component (a spanning star)."""
    order = np.argsort(comp, kind="stable")
    comp_s, nodes_s = comp[order], nodes[order]
    first = np.r_[True, comp_s[1:] != comp_s[:-1]]
    root = nodes_s[np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))]
    return nodes_s[~first], root[~first]


def threshold_components(
    e: np.ndarray, threshold: float, chunk: int = 8192, device: str = "cpu"
) -> np.ndarray:
    """Connected components of the graph cos(i, j) >= threshold; labels (N,) in 0..C-1."""
    n = len(e)
    mm = _matmul(device)
    er, ec = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    stored = 0
    for a in range(0, n, chunk):
        for b in range(a, n, chunk):
            i, j = np.nonzero(mm(e[a : a + chunk], e[b : b + chunk]) >= threshold)  # block (ca, cb)
            if not len(i):
                continue
            i, j = i + a, j + b
            nodes = np.unique(np.concatenate([i, j]))
            local = _components(len(nodes), np.searchsorted(nodes, i), np.searchsorted(nodes, j))
            r, c = _star(nodes, local)
            er.append(r)
            ec.append(c)
            stored += len(r)
        if stored > 4 * n:  # compact: one star per global component
            r, c = _star(np.arange(n), _components(n, np.concatenate(er), np.concatenate(ec)))
            er, ec, stored = [r], [c], len(r)
    comp = _components(n, np.concatenate(er), np.concatenate(ec))
    return np.unique(comp, return_inverse=True)[1]


def _centres(e: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    sums = np.zeros((n_clusters, e.shape[1]), np.float64)
    np.add.at(sums, labels, e)
    return _unit(sums)


def _split_chained(
    e: np.ndarray, labels: np.ndarray, threshold: float, seed: int, max_depth: int = 16
) -> np.ndarray:
    """Recursively split a cluster by spherical 2-means while its halves' centres have cosine < threshold."""
    labels = labels.copy()
    next_id = int(labels.max()) + 1
    queue = [(c, 0) for c in np.unique(labels)]
    while queue:
        c, depth = queue.pop()
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2 or depth >= max_depth:
            continue
        halves, centres = spherical_kmeans(e[idx], 2, seed)
        if halves.min() == halves.max() or float(centres[0] @ centres[1]) >= threshold:
            continue
        labels[idx[halves == 1]] = next_id
        queue += [(c, depth + 1), (next_id, depth + 1)]
        next_id += 1
    return np.unique(labels, return_inverse=True)[1]


def cluster_unlabelled(
    embeddings: np.ndarray,
    threshold: float = 0.5,
    chunk: int = 8192,
    min_size: int = 1,
    refine: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> ClusterResult:
    """Identities as threshold-graph components; clusters smaller than ``min_size`` are dropped (-1)."""
    e = _check(embeddings)
    if not -1.0 <= threshold <= 1.0 or chunk < 1 or min_size < 1:
        raise ValueError(
            f"need -1 <= threshold <= 1, chunk >= 1, min_size >= 1; got {threshold}, {chunk}, {min_size}"
        )
    labels = threshold_components(e, threshold, chunk, device)
    n_components = int(labels.max()) + 1
    outliers = np.zeros(len(e), dtype=bool)
    if refine:
        labels = _split_chained(e, labels, threshold, seed)
        c = _centres(e, labels, int(labels.max()) + 1)
        best = np.empty(len(e), np.float32)
        for a in range(0, len(e), chunk):  # reassign to the nearest centre, chunked (chunk, C)
            sims = _matmul(device)(e[a : a + chunk], c)
            labels[a : a + chunk], best[a : a + chunk] = sims.argmax(1), sims.max(1)
        outliers = best < threshold
    sizes = np.bincount(labels[~outliers], minlength=int(labels.max()) + 1)
    keep = ~outliers & (sizes[labels] >= min_size)
    identity = np.full(len(e), -1, dtype=np.int64)
    ids = np.unique(labels[keep])
    identity[keep] = np.searchsorted(ids, labels[keep])  # renumbered 0..C-1
    centres = (
        _centres(e[keep], identity[keep], len(ids)) if keep.any() else np.zeros((0, e.shape[1]), np.float32)
    )
    within = np.einsum("nd,nd->n", e[keep], centres[identity[keep]]) if keep.any() else np.zeros(0)
    report = {
        "mode": "unlabelled",
        "threshold": threshold,
        "refine": refine,
        "min_size": min_size,
        "components_before_refine": n_components,
        "outliers": int(outliers.sum()),
        "dropped_small": int((~keep & ~outliers).sum()),
        **_common_report(identity, within, centres, seed),
    }
    return ClusterResult(identity=identity, keep=keep, centres=dict(enumerate(centres)), report=report)


def _bar(counts: list[int], width: int = 40) -> list[str]:
    top = max(max(counts), 1)
    return ["#" * round(width * c / top) for c in counts]


def write_report(result: ClusterResult, path: str | Path) -> Path:
    """``<path>.json`` (the report dict) and ``<path>.txt`` (a readable summary); returns the JSON path."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".json", ".txt") else path
    base.parent.mkdir(parents=True, exist_ok=True)
    js, txt = base.with_name(base.name + ".json"), base.with_name(base.name + ".txt")
    js.write_text(json.dumps(result.report, indent=1))
    r = result.report
    lines = [
        (
            f"identity clustering ({r['mode']}): {r['images']} images, {r['kept']} kept, "
            f"{r['dropped']} dropped, {r['clusters']} clusters"
        ),
        f"largest cluster sizes: {r['cluster_sizes'][:20]}",
        "cluster size -> count: " + ", ".join(f"{s}: {c}" for s, c in r["size_histogram"].items()),
    ]
    for key in ("within_similarity", "between_similarity"):
        h = r[key]
        mean = "n/a" if h["mean"] is None else f"{h['mean']:.3f}"
        lines += ["", f"{key.replace('_', ' ')} (cosine; mean {mean})"]
        for lo, cnt, bar in zip(h["bins"][:-1], h["counts"], _bar(h["counts"])):
            if cnt:
                lines.append(f"  [{lo:+.2f}, {lo + 0.05:+.2f})  {cnt:7d}  {bar}")
    txt.write_text("\n".join(lines) + "\n")
    log.info("cluster report written to %s and %s", js, txt)
    return js
