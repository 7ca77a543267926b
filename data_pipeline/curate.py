"""The curation job: raw photos -> identity-grouped webdataset shards + ``manifest.json``.

Stage 1, per work unit (parallel, resumable): decode -> detect (``detect_batch_size`` images at a
time) -> filter -> align (the 112 ArcFace
crop and the training crop) -> occlusion test (optional, CLIP zero-shot on the training crops) ->
caption (the ``captioner`` backend) -> embed. The input listing is sorted and cut into contiguous units
of ``unit_size`` files; worker ``rank`` of ``world_size`` takes units ``rank, rank + world, ...``.
A unit's results are written to a temporary folder and renamed into ``_units/unit-NNNNNN``: a
killed job leaves no partial unit, and a re-run skips committed units.

Stage 2, finalize (idempotent, once all units are committed): identity clustering (optional:
``labelled`` cleans each person's images, ``unlabelled`` assigns identities; a report is written
beside the shards), near-duplicate removal within each identity, grouping by identity (provided
ids, person folders, clusters, or one identity per image),
shards written to temporary names and renamed, stale shards removed, manifest last. Every input
file is counted exactly once: ``files_seen = images_accepted + sum(rejected.values())``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .align import align_face, transform_points
from .caption import make_captioner
from .cluster import cluster_labelled, cluster_unlabelled, write_report
from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from .detect import make_detector
from .embed import make_embedder
from .filters import FilterConfig, check_face, near_duplicates
from .shards import GroupImage, split_group, write_manifest, write_shards
from .sources import open_source

log = logging.getLogger(__name__)
UNITS = "_units"


@dataclass
class CurateConfig:
    input: str
    output: str
    detector: str = "landmarks"
    embedder: str | None = None
    """Face-encoder folder, backbone.pth or recognition .onnx; None: no embeddings."""
    resolution: int = 512
    crop_scale: float = 0.8
    """Training crop = ArcFace template zoomed out by this factor (1.0 = the tight ArcFace crop)."""
    person_folders: bool = False
    unit_size: int = 256
    workers: int = 1
    rank: int | None = None
    world_size: int | None = None
    max_group_size: int = 16
    groups_per_shard: int = 1000
    jpeg_quality: int = 95
    detect_batch_size: int = 32
    """Decoded images handed to the detector at once (insightface runs them as one batch)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    filters: FilterConfig = field(default_factory=FilterConfig)
    occlusion_model: str | None = None
    """open_clip spec of the occlusion test (``filters.occlusion``): ``local-dir:/path``,
    ``ARCH@/path/weights.bin`` or ``hf-hub:org/repo`` (cached)."""
    captioner: str = "provided"
    """``provided`` | ``celeba`` | ``blip`` | ``lavis`` (:mod:`idforge.data_pipeline.caption`)."""
    captioner_options: dict = field(default_factory=dict)
    """Keyword arguments of the captioner (e.g. ``model``, ``batch_size``, ``device`` for ``blip``)."""
    cluster: str | None = None
    """Identity clustering: None, ``labelled`` (per provided person) or ``unlabelled`` (needs ``embedder``)."""
    cluster_options: dict = field(default_factory=dict)
    """Keyword arguments of :func:`cluster_labelled` (k, min_similarity) or :func:`cluster_unlabelled`
    (threshold, min_size, refine, chunk, device)."""

    def __post_init__(self):
        if isinstance(self.filters, dict):
            self.filters = FilterConfig(**self.filters)
        if self.filters.occlusion and not self.occlusion_model:
            raise ValueError(
                "filters.occlusion is on but occlusion_model is not set: give an open_clip spec "
                "(local-dir:/path, ARCH@/path/weights.bin) in the curation config"
            )
        if self.cluster not in (None, "labelled", "unlabelled"):
            raise ValueError(f"cluster must be null, 'labelled' or 'unlabelled', got {self.cluster!r}")
        if self.cluster and not self.embedder:
            raise ValueError(
                f"cluster={self.cluster!r} needs face embeddings: set embedder (a face-encoder folder, "
                "backbone.pth or recognition .onnx)"
            )
        if (
            self.unit_size < 1
            or self.resolution < 16
            or self.max_group_size < 1
            or self.detect_batch_size < 1
        ):
            raise ValueError("unit_size, max_group_size, detect_batch_size must be >= 1 and resolution >= 16")
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_ARRAY_TASK_COUNT", "1")))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")


def _code_version() -> str:
    from idforge import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def _units(n_items: int, unit_size: int) -> list[range]:
    return [range(s, min(s + unit_size, n_items)) for s in range(0, n_items, unit_size)]


_STATE: dict = {}


def _tools(cfg: CurateConfig) -> dict:
    """The unit stage's models, built once per process and reused across its units."""
    key = json.dumps(
        [
            cfg.detector,
            cfg.embedder,
            cfg.occlusion_model,
            asdict(cfg.filters),
            cfg.captioner,
            cfg.captioner_options,
        ],
        sort_keys=True,
        default=str,
    )
    if _STATE.get("key") != key:
        occlusion = None
        if cfg.filters.occlusion:
            from .filters import OcclusionFilter

            occlusion = OcclusionFilter.from_spec(cfg.occlusion_model, cfg.filters)
        _STATE.clear()
        _STATE.update(
            key=key,
            detector=make_detector(cfg.detector),
            embedder=make_embedder(cfg.embedder),
            occlusion=occlusion,
            captioner=make_captioner(cfg.captioner, **cfg.captioner_options),
        )
    return _STATE


def _accept(
    cfg: CurateConfig,
    item,
    image: np.ndarray,
    detections,
    accepted: list,
    rejects: dict,
    crops: list,
    crops112: list,
) -> None:
    """Filter one decoded image's detections; align and record it, or record why it was rejected."""
    det, reason = check_face(image, detections, cfg.filters)
    if reason:
        rejects[item.key] = reason
        return
    crop112, _ = align_face(image, det.landmarks, size=112, scale=1.0)
    crop, matrix = align_face(image, det.landmarks, size=cfg.resolution, scale=cfg.crop_scale)
    box = transform_points(det.box.reshape(2, 2), matrix).reshape(-1)
    meta = item.meta
    identity = meta.get("identity") or meta.get("person") or Path(item.key).stem
    accepted.append(
        {
            "source": item.key,
            "identity": str(identity),
            "split": meta.get("split", "train"),
            "caption": meta.get("caption", ""),
            "attributes": meta.get("attributes", {}),
            "landmarks": transform_points(det.landmarks, matrix).round(3).tolist(),
            "box": [round(float(v), 3) for v in box],
            "score": round(det.score, 4),
            "quality": {"face_px": round(det.size, 1), "source_size": list(image.shape[:2])},
        }
    )
    crops.append(crop)
    crops112.append(crop112)


def process_unit(cfg: CurateConfig, unit: int, items=None) -> Path:
    """Run stage 1 on one unit and commit it atomically; returns the unit folder."""
    root = Path(cfg.output) / UNITS
    final = root / f"unit-{unit:06d}"
    if (final / "records.json").is_file():
        return final
    items = items if items is not None else open_source(cfg.input, cfg.person_folders)
    span = _units(len(items), cfg.unit_size)[unit]
    tools = _tools(cfg)
    for stale in root.glob(f".unit-{unit:06d}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".unit-{unit:06d}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    accepted, rejects, crops, crops112 = [], {}, [], []
    decoded = []  # (item, image) of the current detection batch

    def flush():
        detections = tools["detector"].detect_batch([im for _, im in decoded], [it.meta for it, _ in decoded])
        for (it, image), dets in zip(decoded, detections):
            _accept(cfg, it, image, dets, accepted, rejects, crops, crops112)
        decoded.clear()

    for i in span:
        item = items[i]
        if item.reject:
            rejects[item.key] = item.reject
            continue
        try:
            decoded.append((item, decode_image(item.read(), item.key, cfg.max_pixels)))
        except DecodeError as exc:
            log.info("skipped %s", exc)
            rejects[item.key] = exc.reason
        if len(decoded) >= cfg.detect_batch_size:
            flush()
    if decoded:
        flush()
    if tools["occlusion"] is not None and crops:
        occluded = tools["occlusion"].flags([Image.fromarray(c) for c in crops])
        for rec in (r for r, o in zip(accepted, occluded) if o):
            rejects[rec["source"]] = "occluded"
        accepted, crops, crops112 = (
            [x for x, o in zip(seq, occluded) if not o] for seq in (accepted, crops, crops112)
        )
    if crops:
        captions = tools["captioner"].caption([Image.fromarray(c) for c in crops], accepted)
        for rec, caption in zip(accepted, captions):
            rec["caption"] = caption
    for n, crop in enumerate(crops):
        Image.fromarray(crop).save(tmp / f"{n:05d}.jpg", quality=cfg.jpeg_quality)
    if tools["embedder"] is not None and crops112:
        np.save(tmp / "emb.npy", tools["embedder"].embed(np.stack(crops112)).astype(np.float16))
    (tmp / "records.json").write_text(json.dumps({"accepted": accepted, "rejected": rejects}))
    os.replace(tmp, final)  # the commit
    return final


def finalize(cfg: CurateConfig, n_units: int, files_seen: int) -> dict:
    root = Path(cfg.output)
    rejected: Counter = Counter()
    by_identity: dict[tuple[str, str], list[GroupImage]] = defaultdict(list)
    for u in range(n_units):
        folder = root / UNITS / f"unit-{u:06d}"
        rec = json.loads((folder / "records.json").read_text())
        rejected.update(rec["rejected"].values())
        emb = np.load(folder / "emb.npy") if (folder / "emb.npy").is_file() else None
        for n, meta in enumerate(rec["accepted"]):
            img = GroupImage(
                jpeg=(folder / f"{n:05d}.jpg").read_bytes(),
                meta={k: v for k, v in meta.items() if k not in ("identity", "split")},
                embedding=None if emb is None else emb[n].astype(np.float32),
            )
            by_identity[(meta["split"], meta["identity"])].append(img)
    if cfg.cluster:
        by_identity = _cluster(cfg, by_identity, rejected)
    groups = defaultdict(list)
    accepted = 0
    thr = cfg.filters.duplicate_threshold
    for (split, identity), images in sorted(by_identity.items()):
        if thr is not None and images[0].embedding is not None and len(images) > 1:
            keep = near_duplicates(np.stack([im.embedding for im in images]), thr)
            rejected["duplicate"] += int((~keep).sum())
            images = [im for im, k in zip(images, keep) if k]
        accepted += len(images)
        groups[split].extend(split_group(identity, images, cfg.max_group_size))
    shard_names = []
    for split, gs in sorted(groups.items()):
        shard_names += write_shards(gs, root, split, cfg.groups_per_shard)
    for stale in root.glob("*.tar"):
        if stale.name not in shard_names:
            stale.unlink()
    manifest = {
        "files_seen": files_seen,
        "images_accepted": accepted,
        "rejected": dict(sorted(rejected.items())),
        "identities": {s: len({g.identity for g in gs}) for s, gs in groups.items()},
        "groups": {s: len(gs) for s, gs in groups.items()},
        "shards": shard_names,
        "config": asdict(cfg),
        "code_version": _code_version(),
    }
    if accepted + sum(rejected.values()) != files_seen:
        raise RuntimeError(
            f"curation accounting mismatch in {root}: {files_seen} files seen but "
            f"{accepted} accepted + {sum(rejected.values())} rejected"
        )
    write_manifest(root, manifest)
    return manifest


def _cluster(cfg: CurateConfig, by_identity: dict, rejected: Counter) -> dict:
    """Identity clustering per split (SPEC.md sec. 4 stage 4); the reports go beside the shards."""
    out: dict[tuple[str, str], list[GroupImage]] = defaultdict(list)
    for split in sorted({s for s, _ in by_identity}):
        keys = [k for k in sorted(by_identity) if k[0] == split]
        images = [im for k in keys for im in by_identity[k]]
        persons = [k[1] for k in keys for _ in by_identity[k]]
        if any(im.embedding is None for im in images):
            raise RuntimeError(
                f"clustering needs embeddings, but units in {cfg.output}/{UNITS} were written "
                "without an embedder: delete them and re-run with embedder set"
            )
        emb = np.stack([im.embedding for im in images])
        opts = dict(cfg.cluster_options)
        if cfg.cluster == "labelled":
            result = cluster_labelled(emb, persons, **opts)
            names = sorted(set(persons))
            label = [names[i] if i >= 0 else None for i in result.identity]
        else:
            result = cluster_unlabelled(emb, **opts)
            label = [f"{split}-c{i:07d}" if i >= 0 else None for i in result.identity]
        write_report(result, Path(cfg.output) / f"cluster_report_{split}")
        rejected["cluster_outlier"] += int((~result.keep).sum())
        for im, name in zip(images, label):
            if name is not None:
                out[(split, name)].append(im)
        log.info(
            "clustering (%s, %s): %d images -> %d identities, %d dropped",
            cfg.cluster,
            split,
            len(images),
            result.report.get("clusters", 0),
            int((~result.keep).sum()),
        )
    return out


def run_curation(cfg: CurateConfig, progress=None) -> dict | None:
    """Run this worker's units, then finalize if every unit is committed; returns the manifest
    (None when other workers' units are still pending)."""
    items = open_source(cfg.input, cfg.person_folders)
    units = _units(len(items), cfg.unit_size)
    mine = list(range(cfg.rank, len(units), cfg.world_size))
    root = Path(cfg.output) / UNITS
    todo = [u for u in mine if not (root / f"unit-{u:06d}" / "records.json").is_file()]
    log.info(
        "%d files in %d units; this worker: %d units, %d to do", len(items), len(units), len(mine), len(todo)
    )
    if cfg.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            for _ in pool.map(process_unit, [cfg] * len(todo), todo):
                if progress:
                    progress(cfg.unit_size)
    else:
        for u in todo:
            process_unit(cfg, u, items)
            if progress:
                progress(len(units[u]))
    pending = [u for u in range(len(units)) if not (root / f"unit-{u:06d}" / "records.json").is_file()]
    if pending:
        log.info("%d units of other workers pending; finalize later with a re-run", len(pending))
        return None
    return finalize(cfg, len(units), len(items))
