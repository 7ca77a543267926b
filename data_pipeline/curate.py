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

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .align import align_face, transform_box, transform_points
from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from .detect import make_detector, resolve_detector
from .embed import make_embedder, resolve_embedder
from .filters import FilterConfig, check_face
from .sources import SourceItem, open_source

log = logging.getLogger(__name__)
UNITS = "_units"
LISTING = "listing.json"
COMMITTED = "unit.json"
STAGE1_FILTERS = ("min_det_score", "min_face_px", "min_face_fraction", "min_resolution", "min_sharpness")


class ConfigMismatchError(ValueError):
    """The committed units of an output folder were written with a different stage-1 config."""


def _expand(path: str | None) -> str | None:
    return None if path is None else os.path.expanduser(os.path.expandvars(str(path)))


def _expand_spec(spec: str | None) -> str | None:
    """Expand ``~``/``$VAR`` in the path part of an open_clip spec (``local-dir:P``, ``ARCH@P``)."""
    if spec is None:
        return None
    for sep in ("local-dir:", "@"):
        if sep in spec:
            head, tail = spec.split(sep, 1)
            return f"{head}{sep}{_expand(tail)}"
    return spec if spec.startswith("hf-hub:") else _expand(spec)


def env_rank_world() -> tuple[int, int]:
    """(rank, world) from ``RANK``/``WORLD_SIZE``, else a SLURM array (ids offset by
    ``SLURM_ARRAY_TASK_MIN``, divided by its step) times ``SLURM_PROCID`` of ``SLURM_NTASKS`` tasks."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
    rank, world = 0, 1
    if "SLURM_ARRAY_TASK_ID" in env:
        lo, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
        rank = (int(env["SLURM_ARRAY_TASK_ID"]) - lo) // step
        hi = int(env.get("SLURM_ARRAY_TASK_MAX", env["SLURM_ARRAY_TASK_ID"]))
        world = int(env.get("SLURM_ARRAY_TASK_COUNT", (hi - lo) // step + 1))
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    if "SLURM_PROCID" in env and ntasks > 1:
        rank, world = rank * ntasks + int(env["SLURM_PROCID"]), world * ntasks
    return rank, world


@dataclass
class CurateConfig:
    input: str
    output: str
    detector: str = "auto"
    """``auto`` (provided landmarks, else an insightface pack, else dlib), ``landmarks``,
    ``insightface`` or ``dlib`` (:func:`idforge.data_pipeline.detect.resolve_detector`)."""
    embedder: str | None = "auto"
    """Face-encoder folder, backbone.pth, recognition .onnx, ``dlib``, ``auto`` (a pack's ArcFace, else
    dlib, else none) or None: no embeddings."""
    device: str = "auto"
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (cuda when available): detector, embedder, occlusion
    CLIP and captioner run there, one copy of each per process."""
    fp16: bool = True
    """Run the torch embedder in half precision on cuda."""
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
    shard_max_bytes: int = 1 << 30
    """A shard is closed once it holds this many bytes (or ``groups_per_shard`` groups)."""
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
    """Keyword arguments of the captioner (e.g. ``model``, ``batch_size``, ``dtype`` for ``blip``)."""
    cluster: str | None = "auto"
    """Identity clustering: ``auto`` (images without a provided identity are clustered when there are
    embeddings), None, ``labelled`` (per provided person) or ``unlabelled`` (all images)."""
    cluster_options: dict = field(default_factory=dict)
    """Keyword arguments of :func:`cluster_labelled` (k, min_similarity) or :func:`cluster_unlabelled`
    (threshold: the embedder's identity threshold unless given, min_size, refine, chunk, device)."""
    heldout: int = 0
    """Identities (with >= 2 images) moved from train to the ``heldout`` split (FlashFace: 200)."""

    def __post_init__(self):
        if isinstance(self.filters, dict):
            self.filters = FilterConfig(**self.filters)
        self.input, self.output = _expand(self.input), _expand(self.output)
        if self.embedder not in (None, "", "none", "auto", "dlib"):
            self.embedder = _expand(self.embedder)
        self.occlusion_model = _expand_spec(self.occlusion_model)
        if self.filters.occlusion and not self.occlusion_model:
            raise ValueError(
                "filters.occlusion is on but occlusion_model is not set: give an open_clip spec "
                "(local-dir:/path, ARCH@/path/weights.bin) in the curation config"
            )
        if self.cluster not in (None, "auto", "labelled", "unlabelled"):
            raise ValueError(f"cluster must be null, auto, 'labelled' or 'unlabelled', got {self.cluster!r}")
        if self.cluster in ("labelled", "unlabelled") and self.embedder in (None, "", "none"):
            raise ValueError(
                f"cluster={self.cluster!r} needs face embeddings: set embedder (auto, a face-encoder "
                "folder, backbone.pth, recognition .onnx or dlib)"
            )
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if (
            self.unit_size < 1
            or self.resolution < 16
            or self.max_group_size < 1
            or self.detect_batch_size < 1
            or self.heldout < 0
        ):
            raise ValueError(
                "unit_size, max_group_size, detect_batch_size must be >= 1, heldout >= 0 and resolution >= 16"
            )
        if self.rank is None or self.world_size is None:
            rank, world = env_rank_world()
            self.rank = rank if self.rank is None else self.rank
            self.world_size = world if self.world_size is None else self.world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        inp, out = Path(self.input).resolve(), Path(self.output).resolve()
        if out == inp or (inp.is_dir() and inp in out.parents):
            raise ValueError(
                f"{self.output}: the output folder is the input folder or inside it (its shards would be "
                "read back as input); choose an output folder outside the input"
            )

    def stage1(self) -> dict:
        """The fields that decide stage-1 results (hashed into the listing)."""
        return {
            "input": self.input,
            "detector": self.detector,
            "embedder": self.embedder,
            "resolution": self.resolution,
            "crop_scale": self.crop_scale,
            "person_folders": self.person_folders,
            "unit_size": self.unit_size,
            "max_pixels": self.max_pixels,
            "jpeg_quality": self.jpeg_quality,
            "filters": {k: getattr(self.filters, k) for k in STAGE1_FILTERS}
            | {"multiple_faces": self.filters.multiple_faces},
        }


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


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


def tmp_suffix() -> str:
    """A temporary-name suffix unique per host and process."""
    return f"{socket.gethostname()}-{os.getpid()}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a host+pid-unique temporary name, fsync it, rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{tmp_suffix()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _committed(cfg: CurateConfig, unit: int) -> bool:
    return (Path(cfg.output) / UNITS / f"unit-{unit:06d}" / COMMITTED).is_file()


# ------------------------------------------------------------------------------ listing and resolution


def read_listing(output: str | Path) -> dict | None:
    path = Path(output) / UNITS / LISTING
    return json.loads(path.read_text()) if path.is_file() else None


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k} ({a.get(k)!r} -> {b.get(k)!r})")
    return out


def resolve_config(cfg: CurateConfig, items: list[SourceItem] | None = None) -> CurateConfig:
    """A copy with ``auto`` detector/embedder resolved: from the committed listing when there is one
    (so that a re-run sees what the first run chose), else from the source and what is installed."""
    listing = read_listing(cfg.output)
    detector, embedder = cfg.detector, cfg.embedder
    if listing is not None:
        old = listing["stage1"]
        detector = old["detector"] if detector == "auto" else detector
        embedder = old["embedder"] if embedder == "auto" else embedder
    if detector == "auto":
        items = items if items is not None else open_source(cfg.input, cfg.person_folders)
        has_landmarks = any(it.meta.get("landmarks") is not None for it in items)
        detector = resolve_detector("auto", has_landmarks)
    embedder = resolve_embedder(embedder)
    if embedder in ("", "none"):
        embedder = None
    if embedder is None and cfg.cluster in ("labelled", "unlabelled"):
        raise ValueError(
            f"cluster={cfg.cluster!r} needs face embeddings but embedder=auto found none: unpack an "
            "insightface pack into ~/.insightface/models/<pack>/, pip install 'idforge[dlib]', or give a "
            "face-encoder path"
        )
    log.info("curation: detector %s, embedder %s", detector, embedder)
    return dataclasses.replace(cfg, detector=detector, embedder=embedder)


def commit_listing(cfg: CurateConfig, items: list[SourceItem]) -> list[SourceItem]:
    """Write the listing once (atomically; concurrent ranks agree) or check it against ``cfg``;
    returns the items in listing order (a file listed before but gone now fails with read_error)."""
    root = Path(cfg.output) / UNITS
    root.mkdir(parents=True, exist_ok=True)
    stage1 = cfg.stage1()
    mine = {"stage1": stage1, "hash": config_hash(stage1), "keys": [it.key for it in items]}
    path = root / LISTING
    if not path.is_file():
        tmp = root / f".{LISTING}.tmp-{tmp_suffix()}"
        with open(tmp, "w") as f:
            json.dump(mine, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if another rank was first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    listing = json.loads(path.read_text())
    if listing["hash"] != mine["hash"]:
        changed = ", ".join(_diff(listing["stage1"], stage1))
        raise ConfigMismatchError(
            f"{path}: the committed units were made with a different config (changed: {changed}); "
            f"re-run with the original config, or use a new output folder (or delete {root})"
        )
    by_key = {it.key: it for it in items}
    new = len(set(by_key) - set(listing["keys"]))
    if new:
        log.warning("%d files appeared since %s was written; they are not curated in this output", new, path)

    def missing(key: str) -> SourceItem:
        def read() -> bytes:
            raise FileNotFoundError(f"{key}: listed in {path} but no longer in {cfg.input}")

        return SourceItem(key=key, read=read)

    return [by_key.get(k) or missing(k) for k in listing["keys"]]


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

    for i in span:
        item = items[i]
        if item.reject:
            out.rejected[item.key] = item.reject
            continue
        try:
            item.load_meta()
            decoded.append((item, decode_image(item.read(), item.key, cfg.max_pixels)))
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


def run_curation(cfg: CurateConfig, progress=None) -> dict | None:
    """Run this worker's units; rank 0 then finalizes if every unit is committed. Returns the manifest,
    or None when this is not rank 0 or other workers' units are still pending (then call
    :func:`idforge.data_pipeline.finalize.finalize_curation` once they are done)."""
    from .finalize import finalize_curation

    items = open_source(cfg.input, cfg.person_folders)
    cfg = resolve_config(cfg, items)
    items = commit_listing(cfg, items)
    units = _units(len(items), cfg.unit_size)
    mine = list(range(cfg.rank, len(units), cfg.world_size))
    todo = [u for u in mine if not _committed(cfg, u)]
    log.info(
        "%d files in %d units; this worker: %d units, %d to do", len(items), len(units), len(mine), len(todo)
    )
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
