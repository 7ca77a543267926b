"""The curation job's configuration and on-disk state, shared by its two stages.

:class:`CurateConfig` (every option of ``idforge curate``), rank/world and device resolution, the
input listing written once with a hash of the stage-1 config (:func:`commit_listing`; a changed config
raises :class:`ConfigMismatchError`), unit folders and their commit marker, atomic fsynced writes.
Stage 1 (:mod:`.curate`) and stage 2 (:mod:`.finalize`) both build on this module and not on each
other, so the job has no import cycle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .decode import DEFAULT_MAX_PIXELS
from .detect import resolve_detector
from .embed import resolve_embedder
from .filters import FilterConfig
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
    decode_threads: int = 4
    """Threads that read and decode the next images while the detector works on the current batch
    (file reads and JPEG decoding release the GIL, so the detector, on the GPU, does not wait on one
    CPU thread). 1: no prefetch."""
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
            or self.decode_threads < 1
            or self.heldout < 0
        ):
            raise ValueError(
                "unit_size, max_group_size, detect_batch_size, decode_threads must be >= 1, heldout >= 0 and resolution >= 16"
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
