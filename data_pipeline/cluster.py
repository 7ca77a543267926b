"""Identity clustering of ArcFace embeddings (curation stage "cluster"), two modes.

(a) :func:`cluster_labelled`: sources with person labels that may be noisy (FlashFace sec. 3.1):
    per person, k-means (scikit-learn ``KMeans`` on the unit vectors; k = 3, or chosen by cosine
    silhouette with ``k="auto"``); the centre of the largest cluster is the person's indicator;
    images in the other clusters, and images whose cosine to the indicator is below
    ``min_similarity`` (0.6), are dropped.
(b) :func:`cluster_unlabelled`: no labels. A k-nearest-neighbour graph from a faiss index (exact
    inner product up to ``flat_max`` embeddings, an IVF index above; on GPUs when faiss has them and
    ``device`` is not "cpu"), kept where cosine >= ``threshold``; identities are its connected
    components (scipy csgraph). Time and memory O(N k), never N x N: millions of embeddings on CPU.

    Chaining risk: single linkage merges two identities when a chain of images links them, each
    step above the threshold (look-alikes, blurred or mislabelled images, relatives). ``refine=True``
    splits chained components and refines within each: a component is a suspect when its mean
    pairwise cosine, or some member's cosine to its centre, is below ``threshold`` (vectorised over all
    components at once); a suspect is split by spherical 2-means, recursively, while the two halves'
    centres have cosine below ``threshold`` (a chain joins groups whose centres are far apart; one
    identity's halves stay close). Then every image is reassigned to the nearest centre among its own
    cluster and its graph neighbours' clusters within its component, and images below ``threshold``
    to all of those are dropped as outliers.

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
    return np.ascontiguousarray(_unit(e))


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn k-means on unit vectors (for them, nearest mean = highest cosine); returns
    (labels (N,), unit centres (k, D))."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(x)))
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), _unit(km.cluster_centers_)


def _choose_k(x: np.ndarray, seed: int, max_k: int = 5, min_silhouette: float = 0.25) -> int:
    """The k in 2..max_k with the best cosine silhouette (scikit-learn), or 1 below ``min_silhouette``."""
    from sklearn.metrics import silhouette_score

    best_k, best = 1, min_silhouette
    for k in range(2, min(max_k, len(x) - 1) + 1):
        labels = spherical_kmeans(x, k, seed)[0]
        if not 2 <= len(np.unique(labels)) <= len(x) - 1:
            continue
        s = silhouette_score(x, labels, metric="cosine")
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


def _sums(e: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Per-cluster sums of the rows of ``e`` (C, D), as one sparse one-hot product."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix(
        (np.ones(len(labels), np.float32), (labels, np.arange(len(labels)))), (n_clusters, len(e))
    )
    return np.asarray(onehot @ e, dtype=np.float64)


def _centres(e: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    return _unit(_sums(e, labels, n_clusters))


def _faiss_index(e: np.ndarray, flat_max: int, nprobe: int, device: str, seed: int):
    """A faiss inner-product index over ``e``: exact up to ``flat_max`` rows, IVF (sqrt(N) lists) above."""
    import faiss

    n, d = e.shape
    gpu = device != "cpu" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device != "cpu" and not gpu:
        log.info(
            "faiss sees no GPU (device=%r, faiss-cpu installed): building the k-NN index on the CPU", device
        )
    if n <= flat_max:
        index, kind = faiss.IndexFlatIP(d), "flat"
    else:
        nlist = int(np.sqrt(n))
        # On CPUs the IVF lists hold 4-bit product-quantised codes scanned with SIMD ("fast scan"), and
        # the 2k best candidates are re-ranked with the exact vectors (RFlat): same neighbours as
        # IVF-Flat on identity data, ~8x less memory traffic per query. GPUs scan IVF-Flat lists.
        codes = f"PQ{d // 4}x4fs,RFlat" if d % 4 == 0 and not gpu else "Flat"
        index = faiss.index_factory(d, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
        kind = f"ivf{nlist}" + (",pq4fs+refine" if codes != "Flat" else "")
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed, ivf.cp.niter = seed, 10
        if codes != "Flat":
            index.k_factor = 2
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(e[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))])
    index.add(e)
    if kind != "flat":
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        kind += f",nprobe{nprobe}"
    return index, kind + (",gpu" if gpu else "")


def knn(
    e: np.ndarray,
    k: int = 32,
    chunk: int = 8192,
    flat_max: int = 20_000,
    nprobe: int = 16,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The ``k`` nearest neighbours of every row of unit ``e`` by cosine: (sims (N, k+1), ids (N, k+1)
    with -1 for none; the row itself is usually among them), and the index used. IVF queries go in
    order of their coarse cell, so consecutive queries scan the same lists (cache, not RAM)."""
    import faiss

    index, kind = _faiss_index(e, flat_max, nprobe, device, seed)
    order = np.arange(len(e))
    if kind.startswith("ivf") and not kind.endswith("gpu"):
        order = np.argsort(faiss.extract_index_ivf(index).quantizer.search(e, 1)[1][:, 0], kind="stable")
    kk = min(k + 1, len(e))
    sims, ids = np.empty((len(e), kk), np.float32), np.empty((len(e), kk), np.int64)
    for a in range(0, len(e), chunk):
        rows = order[a : a + chunk]
        sims[rows], ids[rows] = index.search(e[rows], kk)
    return sims, ids, kind


def _graph_components(sims: np.ndarray, ids: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the k-NN graph's edges with cosine >= threshold; labels (N,) in 0..C-1."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ids)
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)
    keep = (ids >= 0) & (ids != rows) & (sims >= threshold)
    graph = csr_matrix((np.ones(int(keep.sum()), np.int8), (rows[keep], ids[keep])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def threshold_components(
    e: np.ndarray,
    threshold: float,
    chunk: int = 8192,
    device: str = "cpu",
    k: int = 32,
    flat_max: int = 20_000,
    nprobe: int = 16,
) -> np.ndarray:
    """Connected components of the k-NN graph kept where cos(i, j) >= threshold; labels (N,) in 0..C-1."""
    sims, ids, _ = knn(e, k, chunk, flat_max, nprobe, device)
    return _graph_components(sims, ids, threshold)


def _suspects(e: np.ndarray, labels: np.ndarray, threshold: float, chunk: int = 65536) -> np.ndarray:
    """Clusters (ids) whose mean pairwise cosine or whose least member-to-centre cosine is below threshold."""
    n_clusters = int(labels.max()) + 1
    sums = _sums(e, labels, n_clusters)
    sizes = np.bincount(labels, minlength=n_clusters)
    pairs = np.maximum(sizes * (sizes - 1), 1)
    mean_pair = ((sums**2).sum(1) - sizes) / pairs  # sum over i != j of cos(i, j) = |sum|^2 - n
    centres = _unit(sums)
    least = np.full(n_clusters, np.inf, np.float32)
    for a in range(0, len(e), chunk):
        cos = np.einsum("nd,nd->n", e[a : a + chunk], centres[labels[a : a + chunk]])  # (chunk,)
        np.minimum.at(least, labels[a : a + chunk], cos)
    return np.flatnonzero((sizes >= 2) & ((mean_pair < threshold) | (least < threshold)))


def _split_chained(
    e: np.ndarray, labels: np.ndarray, threshold: float, seed: int, max_depth: int = 16
) -> tuple[np.ndarray, int, int]:
    """Split suspect clusters by spherical 2-means, recursively, while the halves' centres have cosine
    below threshold; returns (labels renumbered 0..C-1, suspects, clusters split)."""
    labels = labels.copy()
    suspects = _suspects(e, labels, threshold)
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], suspects)
    ends = np.searchsorted(labels[order], suspects, side="right")
    queue = [(order[a:b], 0) for a, b in zip(starts, ends)]
    next_id, split = int(labels.max()) + 1, 0
    while queue:
        idx, depth = queue.pop()
        if len(idx) < 2 or depth >= max_depth:
            continue
        halves, centres = spherical_kmeans(e[idx], 2, seed, n_init=1)
        if halves.min() == halves.max() or float(centres[0] @ centres[1]) >= threshold:
            continue
        labels[idx[halves == 1]] = next_id
        queue += [(idx[halves == 0], depth + 1), (idx[halves == 1], depth + 1)]
        next_id, split = next_id + 1, split + 1
    return np.unique(labels, return_inverse=True)[1], len(suspects), split


def _reassign(
    e: np.ndarray, labels: np.ndarray, comp: np.ndarray, ids: np.ndarray, rows: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Each image to the nearest centre among its own cluster's and its neighbours' clusters within its
    component (O(N k D)); returns (labels, cosine to the chosen centre)."""
    centres = _centres(e, labels, int(labels.max()) + 1)
    safe = np.where(ids >= 0, ids, np.arange(len(ids))[:, None])
    same = comp[safe] == comp[:, None]
    cand = np.concatenate([labels[:, None], np.where(same, labels[safe], labels[:, None])], 1)  # (N, k+2)
    out, best = labels.copy(), np.empty(len(e), np.float32)
    for a in range(0, len(e), rows):
        c = cand[a : a + rows]
        cos = np.einsum("nd,nkd->nk", e[a : a + rows], centres[c])  # (rows, k+2)
        j = cos.argmax(1)
        out[a : a + rows], best[a : a + rows] = c[np.arange(len(c)), j], cos[np.arange(len(c)), j]
    return out, best


def cluster_unlabelled(
    embeddings: np.ndarray,
    threshold: float = 0.5,
    chunk: int = 8192,
    min_size: int = 1,
    refine: bool = False,
    seed: int = 0,
    device: str = "cpu",
    k: int = 32,
    flat_max: int = 20_000,
    nprobe: int = 16,
) -> ClusterResult:
    """Identities as components of the thresholded k-NN graph; clusters smaller than ``min_size`` are
    dropped (-1). ``k`` neighbours per image, ``chunk`` queries per faiss search, exact search up to
    ``flat_max`` images and IVF with ``nprobe`` probed lists above, on GPUs when faiss has them."""
    e = _check(embeddings)
    if not -1.0 <= threshold <= 1.0 or chunk < 1 or min_size < 1 or k < 1:
        raise ValueError(
            f"need -1 <= threshold <= 1, chunk >= 1, min_size >= 1, k >= 1; "
            f"got {threshold}, {chunk}, {min_size}, {k}"
        )
    sims, ids, index = knn(e, k, chunk, flat_max, nprobe, device, seed)
    labels = comp = _graph_components(sims, ids, threshold)
    n_components = int(labels.max()) + 1
    outliers = np.zeros(len(e), dtype=bool)
    suspects = split = 0
    if refine:
        labels, suspects, split = _split_chained(e, labels, threshold, seed)
        labels, best = _reassign(e, labels, comp, ids)
        outliers = best < threshold
    sizes = np.bincount(labels[~outliers], minlength=int(labels.max()) + 1)
    keep = ~outliers & (sizes[labels] >= min_size)
    identity = np.full(len(e), -1, dtype=np.int64)
    ids_kept = np.unique(labels[keep])
    identity[keep] = np.searchsorted(ids_kept, labels[keep])  # renumbered 0..C-1
    centres = (
        _centres(e[keep], identity[keep], len(ids_kept))
        if keep.any()
        else np.zeros((0, e.shape[1]), np.float32)
    )
    within = np.einsum("nd,nd->n", e[keep], centres[identity[keep]]) if keep.any() else np.zeros(0)
    report = {
        "mode": "unlabelled",
        "threshold": threshold,
        "refine": refine,
        "min_size": min_size,
        "k": k,
        "index": index,
        "components_before_refine": n_components,
        "suspect_components": suspects,
        "splits": split,
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
