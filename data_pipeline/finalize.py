"""Stage 2 of the curation job: committed units -> identity-grouped shards + ``manifest.json``.

Reads metadata only (the units' ``records.jsonl`` fields identity/split and ``emb.npy``), keeping a
few integers per image plus the float16 embeddings; then

1. identity clustering (SPEC.md sec. 4 stage 4; reports beside the shards);
2. near-duplicate removal within each identity;
3. the held-out split: ``heldout`` identities with >= 2 images, chosen by the hash of their name
   (stable when other identities come and go), moved from ``train`` to ``heldout``;
4. occlusion test and captioning, only on the survivors (resumable: one ``post-<hash>.json`` per
   unit);
5. crops streamed group by group (with ``emb.npy`` when the embedder is ArcFace; dlib's
   descriptors serve clustering and de-duplication only) into ``webdataset.ShardWriter`` (``<split>-NNNNNN.tar``, at most
   ``groups_per_shard`` groups or ``shard_max_bytes`` bytes each; fixed mtime, so equal inputs give
   byte-identical shards), each shard fsynced and renamed from a host+pid-unique temporary name;
   stale shards removed; manifest last.

Peak memory does not grow with the crops: a group's JPEGs are read when it is written. One finalizer
at a time: an exclusive ``fcntl.flock`` on ``.finalize.lock``; a second finalizer waits, then finds
the manifest complete and returns it (a re-run with an unchanged config is a no-op).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from .cluster import cluster_labelled, cluster_unlabelled, write_report
from .embed import THRESHOLDS, embedder_kind
from .filters import near_duplicates
from .job import (
    COMMITTED,
    UNITS,
    CurateConfig,
    _code_version,
    _units,
    config_hash,
    fsync_path,
    read_listing,
    resolve_config,
    resolve_device,
    tmp_suffix,
    write_atomic,
)
from .shards import GroupImage, IdentityGroup, group_key, group_sample, write_manifest

log = logging.getLogger(__name__)
SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
SHARD_MTIME = 0.0


class FinalizeLock:
    """An exclusive lock file (``fcntl.flock``) in the output folder; blocks until it is free."""

    def __init__(self, output: str | Path):
        self.path = Path(output) / ".finalize.lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _finalize_fields(cfg: CurateConfig) -> dict:
    f = cfg.filters
    return {
        "cluster": cfg.cluster,
        "cluster_options": cfg.cluster_options,
        "duplicate_threshold": f.duplicate_threshold,
        "occlusion": [
            f.occlusion,
            cfg.occlusion_model,
            f.occlusion_prompts,
            f.clean_prompt,
            f.occlusion_threshold,
        ]
        if f.occlusion
        else None,
        "captioner": [cfg.captioner, cfg.captioner_options],
        "max_group_size": cfg.max_group_size,
        "groups_per_shard": cfg.groups_per_shard,
        "shard_max_bytes": cfg.shard_max_bytes,
        "heldout": cfg.heldout,
    }


class Records:
    """Random access to one line of a unit's ``records.jsonl`` (through ``records.idx.npy``)."""

    def __init__(self, root: Path):
        self.root = root
        self._idx: dict[int, np.ndarray] = {}

    def folder(self, unit: int) -> Path:
        return self.root / f"unit-{unit:06d}"

    def get(self, unit: int, row: int) -> dict:
        if unit not in self._idx:
            if len(self._idx) > 4096:
                self._idx.clear()
            self._idx[unit] = np.load(self.folder(unit) / "records.idx.npy")
        start, end = self._idx[unit][row], self._idx[unit][row + 1]
        with open(self.folder(unit) / "records.jsonl", "rb") as f:
            f.seek(int(start))
            return json.loads(f.read(int(end - start)))

    def jpeg(self, unit: int, row: int) -> bytes:
        return (self.folder(unit) / f"{row:05d}.jpg").read_bytes()


def finalize_curation(cfg: CurateConfig) -> dict:
    """Write the shards and the manifest from the committed units (all must be committed). Safe to
    call from several processes at once: one writes, the others wait and return its manifest."""
    cfg = resolve_config(cfg)
    root = Path(cfg.output)
    listing = read_listing(root)
    if listing is None:
        raise FileNotFoundError(f"{root / UNITS}: no curation units here; run the unit stage first")
    n_items = len(listing["keys"])
    n_units = len(_units(n_items, cfg.unit_size))
    pending = [u for u in range(n_units) if not (root / UNITS / f"unit-{u:06d}" / COMMITTED).is_file()]
    if pending:
        raise RuntimeError(
            f"{root / UNITS}: {len(pending)} of {n_units} units are not committed yet (first: {pending[0]}); "
            "finalize once every worker has finished"
        )
    key = config_hash({"listing": listing["hash"], "finalize": _finalize_fields(cfg)})
    with FinalizeLock(root):
        done = _complete_manifest(root, key)
        if done is not None:
            log.info("%s is complete for this config; nothing to do", root / "manifest.json")
            return done
        return _finalize(cfg, root, n_items, n_units, key)


def _complete_manifest(root: Path, key: str) -> dict | None:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("finalize_key") == key and all((root / s).is_file() for s in manifest["shards"]):
        return manifest
    return None


def _finalize(cfg: CurateConfig, root: Path, n_items: int, n_units: int, key: str) -> dict:
    records = Records(root / UNITS)
    rejected: Counter = Counter()
    unit_ix, row_ix, split_ix, name_ix, embs = [], [], [], [], []
    splits: dict[str, int] = {}
    names: dict[str, int] = {}  # provided identity names; -1 = the image's own key
    has_emb = True
    for u in range(n_units):
        folder = records.folder(u)
        unit = json.loads((folder / COMMITTED).read_text())
        rejected.update(unit["rejected"].values())
        n = unit["n_accepted"]
        if not n:
            continue
        with open(folder / "records.jsonl", "rb") as f:
            for row, line in enumerate(f):
                rec = json.loads(line)
                unit_ix.append(u)
                row_ix.append(row)
                split_ix.append(splits.setdefault(rec["split"], len(splits)))
                name_ix.append(names.setdefault(rec["identity"], len(names)) if rec["labelled"] else -1)
        if (folder / "emb.npy").is_file():
            embs.append(np.load(folder / "emb.npy"))
        else:
            has_emb = False
    unit_a = np.asarray(unit_ix, dtype=np.int32)
    row_a = np.asarray(row_ix, dtype=np.int32)
    split_a = np.asarray(split_ix, dtype=np.int16)
    name_a = np.asarray(name_ix, dtype=np.int64)
    del unit_ix, row_ix, split_ix, name_ix
    emb = np.concatenate(embs) if has_emb and embs else None
    del embs
    split_names = {v: k for k, v in splits.items()}
    name_list = [None] * len(names)
    for k, v in names.items():
        name_list[v] = k
    del names
    keep = np.ones(len(unit_a), dtype=bool)

    # 1. identity clustering -> gid: one group id per image; group names (None: the image's own key)
    gid, group_names = _identities(cfg, root, split_a, name_a, name_list, split_names, emb, keep, rejected)

    # 2. near-duplicates within each identity
    kind = embedder_kind(cfg.embedder)
    thr = cfg.filters.duplicate_threshold
    thr = THRESHOLDS[kind]["duplicate"] if thr == "auto" and kind else (None if thr == "auto" else thr)
    if thr is not None and emb is not None:
        for idx in _members(gid, keep):
            if len(idx) > 1:
                dup = ~near_duplicates(emb[idx].astype(np.float32), thr)
                keep[idx[dup]] = False
                rejected["duplicate"] += int(dup.sum())

    # 3. held-out identities
    heldout = _heldout(cfg, gid, keep, split_a, splits, group_names)
    split_names = {v: k for k, v in splits.items()}

    # 4. occlusion and captions on the survivors only
    captions = _post_stage(cfg, records, unit_a, row_a, keep, rejected)

    # 5. stream the shards
    order = _group_order(gid, keep, unit_a, row_a, group_names)
    # only ArcFace embeddings go into the shards (the adapter's identity input); dlib's 128-d
    # descriptors served clustering and de-duplication only
    shard_emb = emb if kind == "arcface" else None
    shard_names, groups, identities, accepted = _write(
        cfg,
        root,
        records,
        order,
        gid,
        split_a,
        split_names,
        unit_a,
        row_a,
        group_names,
        heldout,
        shard_emb,
        captions,
    )
    for stale in root.iterdir():
        if (SHARD_NAME.match(stale.name) and stale.name not in shard_names) or ".tar.tmp-" in stale.name:
            stale.unlink()
    for stale in (root / UNITS).glob(".unit-*.tmp-*"):  # left by killed workers
        shutil.rmtree(stale, ignore_errors=True)
    manifest = {
        "files_seen": n_items,
        "images_accepted": accepted,
        "rejected": dict(sorted(rejected.items())),
        "identities": identities,
        "groups": groups,
        "shards": shard_names,
        "heldout_identities": sorted(heldout),
        "config": asdict(cfg),
        "finalize_key": key,
        "code_version": _code_version(),
    }
    if accepted + sum(rejected.values()) != n_items:
        raise RuntimeError(
            f"curation accounting mismatch in {root}: {n_items} files seen but "
            f"{accepted} accepted + {sum(rejected.values())} rejected"
        )
    why = why_nothing_accepted(manifest)
    if why:
        manifest["why_nothing_accepted"] = why
        log.warning("%s", why)
    write_manifest(root, manifest)
    return manifest


def _members(gid: np.ndarray, keep: np.ndarray) -> list[np.ndarray]:
    """Indices of the kept images of each group (in input order), groups in id order."""
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(gid[idx], kind="stable")]
    bounds = np.flatnonzero(np.diff(gid[idx])) + 1
    return [g for g in np.split(idx, bounds) if len(g)]


def _identities(cfg, root, split_a, name_a, name_list, split_names, emb, keep, rejected):
    """Group id per image and the group names; clustering per split as ``cfg.cluster`` says."""
    n = len(split_a)
    gid = np.full(n, -1, dtype=np.int64)
    group_names: list[str | None] = []
    named: dict[tuple[int, str], int] = {}

    def name_group(s: int, name: str) -> int:
        if (s, name) not in named:  # a new group's name is appended once, not once per image
            named[(s, name)] = _append(group_names, name)
        return named[(s, name)]

    mode = cfg.cluster
    if mode == "auto":
        mode = "unlabelled-only" if emb is not None and (name_a < 0).any() else None
    kind = embedder_kind(cfg.embedder)
    for s in sorted(split_names):
        split = split_names[s]
        in_split = split_a == s
        labelled = in_split & (name_a >= 0)
        cluster_mask = {
            "unlabelled": in_split,
            "labelled": in_split,
            "unlabelled-only": in_split & (name_a < 0),
        }.get(mode, np.zeros(n, dtype=bool))
        for i in np.flatnonzero(labelled & ~cluster_mask):
            gid[i] = name_group(s, name_list[name_a[i]])
        idx = np.flatnonzero(cluster_mask)
        if len(idx):
            if emb is None:
                raise RuntimeError(
                    f"clustering needs embeddings, but units in {root / UNITS} were written without an "
                    "embedder: delete them and re-run with embedder set"
                )
            e = emb[idx].astype(np.float32)
            opts = dict(cfg.cluster_options)
            if mode == "labelled":
                persons = [name_list[k] if k >= 0 else f"\0{i}" for k, i in zip(name_a[idx], idx)]
                result = cluster_labelled(e, persons, **opts)
                uniq = sorted(set(persons))
                label = [uniq[c] if c >= 0 else None for c in result.identity]
            else:
                if kind:
                    opts.setdefault("threshold", THRESHOLDS[kind]["identity"])
                result = cluster_unlabelled(e, **opts)
                label = [f"{split}-c{c:07d}" if c >= 0 else None for c in result.identity]
            write_report(result, root / f"cluster_report_{split}")
            dropped = ~np.asarray(result.keep, dtype=bool)
            rejected["cluster_outlier"] += int(dropped.sum())
            keep[idx[dropped]] = False
            for i, lab in zip(idx, label):
                if lab is not None and not lab.startswith("\0"):
                    gid[i] = name_group(s, lab)
            log.info(
                "clustering (%s, %s): %d images -> %d identities, %d dropped",
                mode,
                split,
                len(idx),
                result.report.get("clusters", 0),
                int(dropped.sum()),
            )
        for i in np.flatnonzero(in_split & (gid < 0) & keep):  # own identity: the image's full key
            gid[i] = _append(group_names, None)
    return gid, group_names


def _append(lst: list, value) -> int:
    lst.append(value)
    return len(lst) - 1


def _heldout(cfg, gid, keep, split_a, splits, group_names) -> set[str]:
    """Move ``cfg.heldout`` named train identities with >= 2 images to the heldout split."""
    if not cfg.heldout or "train" not in splits:
        return set()
    train = splits["train"]
    held = splits.setdefault("heldout", len(splits))
    sizes = np.bincount(gid[keep], minlength=len(group_names))
    split_of = np.full(len(group_names), -1)
    split_of[gid[keep]] = split_a[keep]
    cands = [g for g in range(len(group_names)) if group_names[g] and sizes[g] >= 2 and split_of[g] == train]
    cands.sort(key=lambda g: hashlib.sha1(group_names[g].encode()).hexdigest())
    chosen = cands[: cfg.heldout]
    if len(chosen) < cfg.heldout:
        log.warning("heldout=%d but only %d train identities have >= 2 images", cfg.heldout, len(chosen))
    split_a[np.isin(gid, chosen)] = held
    return {group_names[g] for g in chosen}


def _post_stage(cfg, records: Records, unit_a, row_a, keep, rejected) -> dict | None:
    """Occlusion test and image captioning on the kept images, per unit, results cached in the unit
    folder (``post-<hash>.json``) so that an interrupted finalize resumes. Returns None when the
    captioner needs no images (it then runs per group at write time)."""
    occlusion = cfg.filters.occlusion
    image_captioner = cfg.captioner == "blip"
    if not occlusion and not image_captioner:
        return None
    tag = config_hash(
        {"post": _finalize_fields(cfg)["occlusion"], "captioner": [cfg.captioner, cfg.captioner_options]}
    )
    tools = None
    captions: dict[tuple[int, int], str] = {}
    kept = np.flatnonzero(keep)
    bounds = np.flatnonzero(np.diff(unit_a[kept])) + 1
    for idx in np.split(kept, bounds):
        if not len(idx):
            continue
        u = int(unit_a[idx[0]])
        rows = [int(r) for r in row_a[idx]]
        path = records.folder(u) / f"post-{tag}.json"
        post = json.loads(path.read_text()) if path.is_file() else None
        if post is None or post["rows"] != rows:
            tools = tools or _post_tools(cfg)
            images = [Image.open(records.folder(u) / f"{r:05d}.jpg").convert("RGB") for r in rows]
            flags = tools["occlusion"].flags(images).tolist() if tools["occlusion"] else [False] * len(rows)
            clean = [i for i, f in enumerate(flags) if not f]
            texts = [""] * len(rows)
            if clean:
                metas = [records.get(u, rows[i]) for i in clean]
                for i, t in zip(clean, tools["captioner"].caption([images[i] for i in clean], metas)):
                    texts[i] = t
            post = {"rows": rows, "occluded": [bool(f) for f in flags], "caption": texts}
            write_atomic(path, json.dumps(post).encode())
        for i, occ, text in zip(idx, post["occluded"], post["caption"]):
            if occ:
                keep[i] = False
                rejected["occluded"] += 1
            elif image_captioner:
                captions[(int(unit_a[i]), int(row_a[i]))] = text
    return captions if image_captioner else None


def _post_tools(cfg) -> dict:
    from .caption import make_captioner
    from .filters import OcclusionFilter

    device = resolve_device(cfg.device)
    occ = (
        OcclusionFilter.from_spec(cfg.occlusion_model, cfg.filters, device=device)
        if cfg.filters.occlusion
        else None
    )
    opts = dict(cfg.captioner_options)
    if cfg.captioner == "blip":
        opts.setdefault("device", device)
    return {"occlusion": occ, "captioner": make_captioner(cfg.captioner, **opts)}


def _group_order(gid, keep, unit_a, row_a, group_names) -> list[np.ndarray]:
    """Groups in a fixed order: named groups by name, then own-key groups in input order."""
    groups = _members(gid, keep)
    return sorted(
        groups,
        key=lambda g: (
            (0, group_names[gid[g[0]]], 0, 0)
            if group_names[gid[g[0]]] is not None
            else (1, "", int(unit_a[g[0]]), int(row_a[g[0]]))
        ),
    )


def _write(
    cfg, root, records, order, gid, split_a, split_names, unit_a, row_a, group_names, heldout, emb, captions
):
    import webdataset as wds

    from .caption import make_captioner

    light_captioner = make_captioner(cfg.captioner, **cfg.captioner_options) if captions is None else None
    by_split: dict[str, list[np.ndarray]] = {}
    for g in order:
        by_split.setdefault(split_names[int(split_a[g[0]])], []).append(g)
    shard_names, groups, identities, accepted = [], {}, {}, 0
    suffix = tmp_suffix()
    for split in sorted(by_split):
        written: list[str] = []

        def post(tmp_name: str, written=written, split=split) -> None:
            fsync_path(Path(tmp_name))
            final = root / f"{split}-{len(written):06d}.tar"
            os.replace(tmp_name, final)
            written.append(final.name)

        pattern = str(root / f".{split}-%06d.tar.tmp-{suffix}")
        n_groups = 0
        with wds.ShardWriter(
            pattern,
            maxcount=cfg.groups_per_shard,
            maxsize=cfg.shard_max_bytes,
            post=post,
            mtime=SHARD_MTIME,
            verbose=0,
        ) as sink:
            for g in by_split[split]:
                recs = [records.get(int(unit_a[i]), int(row_a[i])) for i in g]
                identity = group_names[gid[g[0]]] or recs[0]["identity"]
                if captions is not None:
                    texts = [captions[(int(unit_a[i]), int(row_a[i]))] for i in g]
                else:
                    texts = light_captioner.caption([None] * len(recs), recs)
                base = group_key(identity)
                parts = range(0, len(g), cfg.max_group_size)
                for p, s in enumerate(parts):
                    images = [
                        GroupImage(
                            jpeg=records.jpeg(int(unit_a[i]), int(row_a[i])),
                            meta={
                                **{
                                    k: v for k, v in rec.items() if k not in ("identity", "split", "labelled")
                                },
                                "caption": text,
                            },
                            embedding=None if emb is None else emb[i].astype(np.float32),
                        )
                        for i, rec, text in zip(
                            g[s : s + cfg.max_group_size], recs[s : s + cfg.max_group_size], texts[s:]
                        )
                    ]
                    k = base if len(parts) == 1 else f"{base}-p{p:03d}"
                    sink.write(group_sample(IdentityGroup(key=k, identity=identity, images=images)))
                    n_groups += 1
                accepted += len(g)
        shard_names += written
        groups[split] = n_groups
        identities[split] = len(by_split[split])
    fsync_path(root)
    return shard_names, groups, identities, accepted


HINTS = {
    "no_face": "the detector ({detector}) found no face: try detector insightface or dlib, or provide "
    "landmarks (landmarks.jsonl, CelebA or FFHQ annotation files)",
    "det_score": "lower filters.min_det_score",
    "face_size": "lower filters.min_face_px / filters.min_face_fraction",
    "resolution": "lower filters.min_resolution (images are smaller than it)",
    "multiple_faces": "set filters.multiple_faces: largest to keep the largest face",
    "blur": "lower filters.min_sharpness (or set it to null)",
    "occluded": "raise filters.occlusion_threshold or turn filters.occlusion off",
    "duplicate": "raise filters.duplicate_threshold (or set it to null)",
    "cluster_outlier": "loosen cluster_options (min_size, min_similarity) or set cluster: null",
    "read_error": "the files could not be read (permissions, a stale network mount); see _units/*/log.txt",
}


def why_nothing_accepted(manifest: dict) -> str | None:
    """None when the run accepted images; else one sentence naming the top reject reason and what to change."""
    if manifest.get("images_accepted", 0) > 0:
        return None
    rejected = manifest.get("rejected") or {}
    if not rejected:
        return f"no input files were found in {manifest.get('config', {}).get('input')}; check --input"
    reason, n = max(rejected.items(), key=lambda kv: (kv[1], kv[0]))
    detector = manifest.get("config", {}).get("detector", "?")
    hint = HINTS.get(reason, "see the unit logs in _units/*/log.txt")
    if reason.startswith("error:"):
        hint = "processing raised this exception; see _units/*/log.txt for the files and messages"
    elif reason in ("decode", "not_image", "empty", "decompression_bomb"):
        hint = "the files are not readable images (see the unit logs); check --input"
    return (
        f"no image was accepted: {n} of {manifest.get('files_seen', 0)} files were rejected as "
        f"{reason!r}; {hint.format(detector=detector)}"
    )
