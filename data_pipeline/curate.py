"""The curation job: raw photos -> identity-grouped webdataset shards + ``manifest.json``.

Stage 1, per work unit (parallel, resumable): decode -> detect (``detect_batch_size`` images at a
time) -> filter -> align (the embedder's crop and the training crop) -> embed. The input listing is
sorted, written once to ``_units/listing.json`` with a hash of the stage-1 config (a re-run with a
different config stops with :class:`ConfigMismatchError` instead of mixing units) and cut into
contiguous units of ``unit_size`` files; worker ``rank`` of ``world_size`` takes units ``rank,
rank + world, ...``. A unit writes its crops (``NNNNN.jpg``), its metadata as columnar files
(``records.jsonl`` + ``records.idx.npy`` line offsets, ``emb.npy``) and ``unit.json`` (reject reasons
and errors; ``log.txt`` names every failed file) into a temporary folder unique per host and pid,
fsyncs them and renames the folder into ``_units/unit-NNNNNN``: a killed job leaves no partial unit,
a re-run skips committed units. Any exception while handling one file rejects that file
(``read_error`` for an OSError, ``error:<ExceptionType>`` otherwise) and the unit goes on.

Stage 2, :func:`idforge.data_pipeline.finalize.finalize_curation` (rank 0 once every unit is
committed, or an explicit call; one finalizer at a time under a lock): metadata only -> identity
clustering -> near-duplicate removal -> held-out split -> occlusion test and captions (only on the
survivors) -> crops streamed into shards -> manifest last. Every input file is counted exactly once:
``files_seen = images_accepted + sum(rejected.values())``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .align import align_face, transform_box, transform_points
from .decode import DecodeError, decode_image
from .detect import make_detector
from .embed import make_embedder
from .filters import check_face
from .finalize import finalize_curation
from .job import (
    COMMITTED,
    UNITS,
    CurateConfig,
    _committed,
    _units,
    commit_listing,
    fsync_path,
    resolve_config,
    resolve_device,
    tmp_suffix,
)
from .sources import SourceItem, open_source

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ stage 1 (units)

_STATE: dict = {}


def _tools(cfg: CurateConfig) -> dict:
    """The unit stage's models, built once per process (on ``cfg.device``) and reused across units."""
    device = resolve_device(cfg.device)
    key = json.dumps([cfg.detector, cfg.embedder, device, cfg.fp16], default=str)
    if _STATE.get("key") != key:
        _STATE.clear()
        _STATE.update(
            key=key,
            detector=make_detector(cfg.detector, device=device),
            embedder=make_embedder(cfg.embedder, device=device, fp16=cfg.fp16),
        )
    return _STATE


def reject_reason(exc: BaseException) -> str:
    """``read_error`` for an OSError (stale NFS handle, permissions...), ``error:<Type>`` otherwise."""
    if isinstance(exc, DecodeError):
        return exc.reason
    return "read_error" if isinstance(exc, OSError) else f"error:{type(exc).__name__}"


class _Unit:
    """One unit's results, written into its temporary folder as they come."""

    def __init__(self, cfg: CurateConfig, tmp: Path, embedder):
        self.cfg, self.tmp, self.embedder = cfg, tmp, embedder
        self.records: list[dict] = []
        self.emb_crops: list[np.ndarray] = []
        self.rejected: dict[str, str] = {}
        self.errors: list[dict] = []

    def fail(self, key: str, exc: BaseException) -> None:
        reason = reject_reason(exc)
        self.rejected[key] = reason
        if not isinstance(exc, DecodeError):
            self.errors.append({"key": key, "reason": reason, "message": str(exc)[:500]})
            log.warning("%s: %s (%s); counted under rejected[%r]", key, type(exc).__name__, exc, reason)
        else:
            log.info("skipped %s", exc)

    def accept(self, item: SourceItem, image: np.ndarray, detections) -> None:
        """Filter one decoded image's detections; align, store and record it, or record why not."""
        cfg = self.cfg
        det, reason = check_face(image, detections, cfg.filters)
        if reason:
            self.rejected[item.key] = reason
            return
        size, scale = (
            (112, 1.0) if self.embedder is None else (self.embedder.input_size, self.embedder.crop_scale)
        )
        emb_crop, _ = align_face(image, det.landmarks, size=size, scale=scale)
        crop, matrix = align_face(image, det.landmarks, size=cfg.resolution, scale=cfg.crop_scale)
        meta = item.meta
        provided = meta.get("identity") or meta.get("person")
        rec = {
            "source": item.key,
            # no provided identity: the full key (never the bare file name: a/0001.jpg != b/0001.jpg)
            "identity": str(provided) if provided else item.key,
            "labelled": bool(provided),
            "split": meta.get("split", "train"),
            "caption": meta.get("caption", ""),
            "attributes": meta.get("attributes", {}),
            "landmarks": transform_points(det.landmarks, matrix).round(3).tolist(),
            "box": [round(float(v), 3) for v in transform_box(det.box, matrix)],
            "score": round(det.score, 4),
            "quality": {"face_px": round(det.size, 1), "source_size": list(image.shape[:2])},
        }
        if meta.get("source_meta"):
            rec["source_meta"] = meta["source_meta"]
        Image.fromarray(crop).save(self.tmp / f"{len(self.records):05d}.jpg", quality=cfg.jpeg_quality)
        self.records.append(rec)
        self.emb_crops.append(emb_crop)

    def embed(self) -> np.ndarray | None:
        """Embeddings of the accepted crops; a crop whose embedding fails is rejected."""
        if self.embedder is None or not self.records:
            return None
        try:
            return self.embedder.embed(np.stack(self.emb_crops))
        except Exception as exc:  # noqa: BLE001 - one file's failure must not stop the job
            log.info("batched embedding failed (%s); embedding the unit's crops one by one", exc)
        out, keep = [], []
        for rec, crop in zip(self.records, self.emb_crops):
            try:
                out.append(self.embedder.embed(crop[None])[0])
                keep.append(True)
            except Exception as exc:  # noqa: BLE001 - counted, the job goes on
                self.fail(rec["source"], exc)
                keep.append(False)
        old = list(zip(self.records, keep))
        self.records = []
        for n, (rec, k) in enumerate(old):
            if k:
                os.replace(self.tmp / f"{n:05d}.jpg", self.tmp / f"{len(self.records):05d}.jpg.new")
                self.records.append(rec)
            else:
                (self.tmp / f"{n:05d}.jpg").unlink()
        for p in self.tmp.glob("*.jpg.new"):
            os.replace(p, p.with_suffix(""))
        return np.stack(out) if out else None

    def write(self) -> None:
        emb = self.embed()
        lines = [json.dumps(r).encode() + b"\n" for r in self.records]
        (self.tmp / "records.jsonl").write_bytes(b"".join(lines))
        np.save(self.tmp / "records.idx.npy", np.cumsum([0] + [len(x) for x in lines]).astype(np.int64))
        if emb is not None:
            np.save(self.tmp / "emb.npy", emb.astype(np.float16))
        if self.errors:
            (self.tmp / "log.txt").write_text(
                "".join(f"{e['key']}\t{e['reason']}\t{e['message']}\n" for e in self.errors)
            )
        unit = {"n_accepted": len(self.records), "rejected": self.rejected, "errors": len(self.errors)}
        (self.tmp / COMMITTED).write_text(json.dumps(unit))
        for p in self.tmp.iterdir():
            fsync_path(p)
        fsync_path(self.tmp)


def _prefetch(pool: ThreadPoolExecutor, fn, items: list, window: int):
    """(item, future of fn(item)) in order, with at most ``window`` calls submitted ahead: the pool
    decodes the next images while the caller's detector works on the current batch."""
    ahead: deque = deque()
    for item in items:
        ahead.append((item, pool.submit(fn, item)))
        if len(ahead) > window:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


def process_unit(cfg: CurateConfig, unit: int, items: list[SourceItem] | None = None) -> Path:
    """Run stage 1 on one unit and commit it atomically; returns the unit folder. ``cfg`` must be
    resolved (:func:`resolve_config`) and ``items`` in listing order (:func:`commit_listing`)."""
    root = Path(cfg.output) / UNITS
    final = root / f"unit-{unit:06d}"
    if (final / COMMITTED).is_file():
        return final
    items = items if items is not None else _process_items(cfg)
    span = _units(len(items), cfg.unit_size)[unit]
    tools = _tools(cfg)
    tmp = root / f".unit-{unit:06d}.tmp-{tmp_suffix()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out = _Unit(cfg, tmp, tools["embedder"])
    decoded: list[tuple[SourceItem, np.ndarray]] = []  # the current detection batch

    def flush():
        images, metas = [im for _, im in decoded], [it.meta for it, _ in decoded]
        try:
            detections = tools["detector"].detect_batch(images, metas)
        except Exception as exc:  # noqa: BLE001 - one file's failure must not stop the job
            log.info("batched detection failed (%s); detecting one image at a time", exc)
            detections = []
            for it, im in decoded:
                try:
                    detections.append(tools["detector"].detect(im, it.meta))
                except Exception as exc:  # noqa: BLE001 - counted, the job goes on
                    out.fail(it.key, exc)
                    detections.append(None)
        for (it, image), dets in zip(decoded, detections):
            if dets is None:
                continue
            try:
                out.accept(it, image, dets)
            except Exception as exc:  # noqa: BLE001 - counted, the job goes on
                out.fail(it.key, exc)
        decoded.clear()

    def load(item: SourceItem) -> np.ndarray:
        item.load_meta()
        return decode_image(item.read(), item.key, cfg.max_pixels)

    todo = []
    for i in span:
        if items[i].reject:
            out.rejected[items[i].key] = items[i].reject
        else:
            todo.append(items[i])
    with ThreadPoolExecutor(cfg.decode_threads) as pool:
        for item, future in _prefetch(pool, load, todo, window=2 * cfg.detect_batch_size):
            try:
                decoded.append((item, future.result()))
            except Exception as exc:  # noqa: BLE001 - counted, the job goes on
                out.fail(item.key, exc)
            if len(decoded) >= cfg.detect_batch_size:
                flush()
    if decoded:
        flush()
    out.write()
    try:
        os.replace(tmp, final)  # the commit
    except OSError:  # another process committed this unit first: keep theirs
        if not (final / COMMITTED).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


_ITEMS: dict = {}


def _process_items(cfg: CurateConfig) -> list[SourceItem]:
    """The listing's items, opened once per process."""
    key = (cfg.input, cfg.person_folders, cfg.output)
    if _ITEMS.get("key") != key:
        _ITEMS.update(key=key, items=commit_listing(cfg, open_source(cfg.input, cfg.person_folders)))
    return _ITEMS["items"]


def run_curation(cfg: CurateConfig, progress=None, on_total=None) -> dict | None:
    """Run this worker's units; rank 0 then finalizes if every unit is committed. Returns the manifest,
    or None when this is not rank 0 or other workers' units are still pending (then call
    :func:`idforge.data_pipeline.finalize.finalize_curation` once they are done). ``on_total(n)`` is
    told the files of this worker's pending units once they are known; ``progress(k)`` then counts
    them unit by unit."""
    items = open_source(cfg.input, cfg.person_folders)
    cfg = resolve_config(cfg, items)
    items = commit_listing(cfg, items)
    units = _units(len(items), cfg.unit_size)
    mine = list(range(cfg.rank, len(units), cfg.world_size))
    todo = [u for u in mine if not _committed(cfg, u)]
    log.info(
        "%d files in %d units; this worker: %d units, %d to do", len(items), len(units), len(mine), len(todo)
    )
    if on_total:
        on_total(sum(len(units[u]) for u in todo))
    if cfg.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            for u, _ in zip(todo, pool.map(process_unit, [cfg] * len(todo), todo)):
                if progress:
                    progress(len(units[u]))
    else:
        for u in todo:
            process_unit(cfg, u, items)
            if progress:
                progress(len(units[u]))
    pending = [u for u in range(len(units)) if not _committed(cfg, u)]
    if pending:
        log.info(
            "%d units of other workers pending; rank 0 or finalize_curation() finishes later", len(pending)
        )
        return None
    if cfg.rank != 0:
        log.info("units done; rank 0 (or finalize_curation) writes the shards")
        return None
    return finalize_curation(cfg)
