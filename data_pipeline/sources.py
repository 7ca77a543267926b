"""Curation sources: each yields :class:`SourceItem`s (a key, lazily read bytes, and metadata).

Supported inputs (chosen by :func:`open_source` from the path):

- an image folder (recursive); with ``person_folders`` the first sub-folder names the person.
  Annotation files at the folder's root add metadata per image (:mod:`.annotations`):
  ``landmarks.jsonl`` (SynthID's format: landmarks, box, caption, identity, attributes, split),
  CelebA / CelebA-HQ files (``list_attr_celeba.txt`` or ``CelebAMask-HQ-attribute-anno.txt``,
  ``list_landmarks_celeba.txt``, ``identity_CelebA.txt``, ``CelebA-HQ-to-CelebA-mapping.txt``) and
  FFHQ's ``ffhq-dataset-v2.json`` (68-point landmarks of every image);
- a ``.tar`` file of images (member names with ``..`` or absolute paths are rejected as
  ``unsafe_path``, never extracted);
- webdataset shards of other tools (img2dataset, LAION-Face): members grouped by webdataset's
  ``__key__`` rule (:func:`webdataset.tariterators.base_plus_ext`); one item per image member
  (``.jpg/.png/.webp``...), its caption read from the sibling ``.txt`` or the ``caption`` field of the
  sibling ``.json`` (the whole json kept under ``source_meta``);
- a folder or glob of webdataset shards written by ``idforge curate`` (re-curation).

Listing is sorted, so the work-unit split is deterministic across runs and workers.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .annotations import ANNOTATION_FILES, load_annotations

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class SourceItem:
    key: str  # unique, stable name of the input file (relative path or tar::member)
    read: Callable[[], bytes]
    meta: dict = field(default_factory=dict)  # landmarks, box, caption, identity, person, split, attributes
    reject: str | None = None  # a reason known before decoding (e.g. unsafe_path)
    read_meta: Callable[[], dict] | None = None  # metadata read lazily in the unit stage (captions)

    def load_meta(self) -> dict:
        """``meta`` with the lazily read metadata merged in (once)."""
        if self.read_meta is not None:
            self.meta = {**self.read_meta(), **self.meta}
            self.read_meta = None
        return self.meta


def _unsafe(name: str) -> bool:
    p = PurePosixPath(name)
    return p.is_absolute() or ".." in p.parts


def iter_folder(root: Path, person_folders: bool = False) -> Iterator[SourceItem]:
    annotations = load_annotations(root)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name not in ANNOTATION_FILES
        and not p.name.endswith(".tmp")
        and p.suffix.lower() not in {".json", ".jsonl", ".txt"}
    )
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() == ".tar":
            yield from iter_tar(path, prefix=rel)
            continue
        meta = annotations.lookup(rel)
        if person_folders and len(PurePosixPath(rel).parts) > 1:
            meta.setdefault("person", PurePosixPath(rel).parts[0])
        yield SourceItem(key=rel, read=path.read_bytes, meta=meta)


def _member_reader(path: Path, member: tarfile.TarInfo) -> Callable[[], bytes]:
    """Read one member on demand: a seek into the plain tar (no archive held in memory)."""
    if member.issparse():

        def read_sparse() -> bytes:
            with tarfile.open(path) as tar:
                return tar.extractfile(member.name).read()

        return read_sparse

    def read() -> bytes:
        with open(path, "rb") as f:
            f.seek(member.offset_data)
            return f.read(member.size)

    return read


def iter_tar(path: Path, prefix: str | None = None) -> Iterator[SourceItem]:
    """Members of a plain (uncompressed) tar; the listing reads headers only, images are read lazily."""
    prefix = prefix or path.name
    try:
        with tarfile.open(path, "r:") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
    except tarfile.TarError as exc:
        log.info("skipped %s: not a readable plain tar (%s)", path, exc)
        yield SourceItem(key=prefix, read=lambda: b"", reject="bad_archive")
        return
    if _is_webdataset(members):
        yield from _webdataset_items(path, prefix, members)
        return
    for m in members:
        key = f"{prefix}::{m.name}"
        if _unsafe(m.name):
            yield SourceItem(key=key, read=lambda: b"", reject="unsafe_path")
            continue
        yield SourceItem(key=key, read=_member_reader(path, m))


CAPTION_SUFFIXES = ("txt", "json")


def _wds_split(name: str) -> tuple[str, str]:
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (key or name), (ext or "").lower()


def _is_webdataset(members: list[tarfile.TarInfo]) -> bool:
    """True when some image member has a ``.txt`` / ``.json`` sibling under the same webdataset key."""
    by_key: dict[str, set[str]] = {}
    for m in members:
        key, ext = _wds_split(m.name)
        by_key.setdefault(key, set()).add(ext)
    return any(
        any(f".{e}" in IMAGE_SUFFIXES for e in exts) and any(e in exts for e in CAPTION_SUFFIXES)
        for exts in by_key.values()
    )


def _caption_reader(path: Path, sidecars: dict[str, tarfile.TarInfo]) -> Callable[[], dict]:
    def read() -> dict:
        meta: dict = {}
        if "json" in sidecars:
            extra = json.loads(_member_reader(path, sidecars["json"])())
            if isinstance(extra, dict):
                meta["source_meta"] = extra
                if extra.get("caption"):
                    meta["caption"] = str(extra["caption"])
        if "txt" in sidecars:
            meta["caption"] = _member_reader(path, sidecars["txt"])().decode("utf-8", "replace").strip()
        return meta

    return read


def _webdataset_items(path: Path, prefix: str, members: list[tarfile.TarInfo]) -> Iterator[SourceItem]:
    """One item per image member of a webdataset shard; captions from its ``.txt`` / ``.json``."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
        key, ext = _wds_split(m.name)
        groups.setdefault(key, {})[ext] = m
    for key, exts in groups.items():
        sidecars = {e: exts[e] for e in CAPTION_SUFFIXES if e in exts}
        for ext, m in exts.items():
            if f".{ext.rsplit('.', 1)[-1]}" not in IMAGE_SUFFIXES:
                continue
            item_key = f"{prefix}::{m.name}"
            if _unsafe(m.name):
                yield SourceItem(key=item_key, read=lambda: b"", reject="unsafe_path")
                continue
            yield SourceItem(
                key=item_key,
                read=_member_reader(path, m),
                read_meta=_caption_reader(path, sidecars) if sidecars else None,
            )


def iter_shards(paths: list[Path]) -> Iterator[SourceItem]:
    """Re-read images (with their stored metadata) from idforge shards."""
    import webdataset as wds

    for url in paths:
        for sample in wds.WebDataset(str(url), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["meta.json"])
            for i, rec in enumerate(meta["images"]):
                ext = f"{i:03d}.jpg"
                yield SourceItem(
                    key=f"{Path(url).name}::{sample['__key__']}/{ext}",
                    read=lambda d=sample[ext]: d,
                    meta={**rec, "identity": meta.get("identity")},
                )


def open_source(path: str | Path, person_folders: bool = False) -> list[SourceItem]:
    """All items of an input path, sorted by key."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".tar":
        items = list(iter_tar(p))
    elif p.is_dir() and list(p.glob("*.tar")) and (p / "manifest.json").is_file():
        items = list(iter_shards(sorted(p.glob("*.tar"))))
    elif p.is_dir():
        items = list(iter_folder(p, person_folders))
    else:
        raise FileNotFoundError(f"curation input {p} is neither a folder, a .tar file, nor a shard folder")
    return sorted(items, key=lambda it: it.key)
