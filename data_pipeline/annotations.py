"""Per-image annotations that datasets ship beside their images (curation stage "ingest", SPEC.md sec. 4).

:func:`load_annotations` reads every annotation file it finds at the root of an image folder and
merges them into one lookup from an image's path (relative to the root; or its file name, since
CelebA and FFHQ list bare names or their own sub-folders) to its metadata:

- ``landmarks.jsonl``: one JSON record per image with ``file`` (relative path) and any of
  ``landmarks`` (5 x 2 or 68 x 2 pixels), ``box``, ``caption``, ``identity``, ``attributes``,
  ``split`` (SynthID writes this format; it is the format to convert other datasets to).
- CelebA / CelebA-HQ (Liu et al. 2015; Karras et al. 2018):
  ``list_attr_celeba.txt`` or CelebAMask-HQ's ``CelebAMask-HQ-attribute-anno.txt`` (the 40 binary
  attributes, values +-1 or 0/1 -> ``attributes``); ``list_landmarks_celeba.txt`` /
  ``list_landmarks_align_celeba.txt`` (5 points per image -> ``landmarks``); ``identity_CelebA.txt``
  (``file identity`` -> ``identity``); with ``CelebA-HQ-to-CelebA-mapping.txt`` the identities of
  the original CelebA files are carried over to CelebA-HQ's ``<idx>.jpg`` files. CelebA's landmark
  files refer to the original CelebA images, so CelebA-HQ images need a detector for landmarks.
- FFHQ (Karras et al. 2019): ``ffhq-dataset-v2.json`` gives 68 landmarks for every image of the
  ``image`` and ``in_the_wild`` sets and, scaled, for the ``thumbnail`` set (-> ``landmarks``,
  reduced to 5 points by the ``landmarks`` detector).

A malformed file is an error that names the file and line; nothing is silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

SIDECAR = "landmarks.jsonl"
CELEBA_ATTRS = ("list_attr_celeba.txt", "CelebAMask-HQ-attribute-anno.txt")
CELEBA_LANDMARKS = ("list_landmarks_celeba.txt", "list_landmarks_align_celeba.txt")
CELEBA_IDENTITY = "identity_CelebA.txt"
CELEBA_HQ_MAPPING = "CelebA-HQ-to-CelebA-mapping.txt"
FFHQ_JSON = "ffhq-dataset-v2.json"
ANNOTATION_FILES = frozenset(
    {SIDECAR, *CELEBA_ATTRS, *CELEBA_LANDMARKS, CELEBA_IDENTITY, CELEBA_HQ_MAPPING, FFHQ_JSON}
)


@dataclass
class Annotations:
    by_path: dict[str, dict] = field(default_factory=dict)
    by_name: dict[str, dict] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def add(self, key: str, meta: dict, by_name: bool = False) -> None:
        table = self.by_name if by_name else self.by_path
        table.setdefault(key, {}).update(meta)

    def lookup(self, rel: str) -> dict:
        """Metadata of the image at ``rel`` (a fresh dict): path records win over name records."""
        meta = dict(self.by_name.get(PurePosixPath(rel).name, {}))
        meta.update(self.by_path.get(rel, {}))
        return meta

    def __len__(self) -> int:
        return len(self.by_path) + len(self.by_name)


def _table(path: Path, min_fields: int) -> tuple[list[str] | None, list[list[str]]]:
    """CelebA's text tables: optional count line, optional header line, then rows."""
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if lines and len(lines[0]) == 1 and lines[0][0].isdigit():
        lines = lines[1:]
    header = None
    if lines and not any(c.isdigit() for c in lines[0][-1]):  # a header row ends with a name
        header, lines = lines[0], lines[1:]
    for n, row in enumerate(lines, 1):
        if len(row) < min_fields:
            raise ValueError(
                f"{path}: row {n} has {len(row)} fields, expected at least {min_fields}: {row[:4]}"
            )
    return header, lines


def _read_sidecar(path: Path, ann: Annotations) -> None:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ann.add(rec["file"], rec)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a JSON record with a 'file' field ({exc})") from exc


def _read_celeba(root: Path, ann: Annotations) -> None:
    from .caption import CELEBA_ATTRIBUTES

    for name in CELEBA_ATTRS:
        path = root / name
        if not path.is_file():
            continue
        header, rows = _table(path, 2)
        if header is None or set(header) - set(CELEBA_ATTRIBUTES):
            raise ValueError(
                f"{path}: the header line is not CelebA's attribute list (got {(header or [])[:4]}...)"
            )
        for row in rows:
            if len(row) != len(header) + 1:
                raise ValueError(f"{path}: {row[0]} has {len(row) - 1} values for {len(header)} attributes")
            ann.add(
                row[0],
                {"attributes": {a: 1 if int(v) > 0 else -1 for a, v in zip(header, row[1:])}},
                by_name=True,
            )
        ann.sources.append(name)
    for name in CELEBA_LANDMARKS:
        path = root / name
        if path.is_file():
            _, rows = _table(path, 11)
            for row in rows:
                pts = [float(v) for v in row[1:11]]
                ann.add(row[0], {"landmarks": [pts[i : i + 2] for i in range(0, 10, 2)]}, by_name=True)
            ann.sources.append(name)
    ident_path = root / CELEBA_IDENTITY
    identities = {}
    if ident_path.is_file():
        _, rows = _table(ident_path, 2)
        identities = {row[0]: row[1] for row in rows}
        for file, ident in identities.items():
            ann.add(file, {"identity": f"celeba-{ident}"}, by_name=True)
        ann.sources.append(CELEBA_IDENTITY)
    mapping = root / CELEBA_HQ_MAPPING
    if mapping.is_file():
        _, rows = _table(mapping, 3)  # idx orig_idx orig_file
        for row in rows:
            hq = f"{int(row[0])}.jpg"
            if row[2] in identities:
                ann.add(hq, {"identity": f"celeba-{identities[row[2]]}"}, by_name=True)
            ann.add(hq, {"celeba_file": row[2]}, by_name=True)
        ann.sources.append(CELEBA_HQ_MAPPING)


def _read_ffhq(root: Path, ann: Annotations) -> None:
    path = root / FFHQ_JSON
    if not path.is_file():
        return
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    for idx, rec in records.items() if isinstance(records, dict) else enumerate(records):
        for part in ("image", "thumbnail", "in_the_wild"):
            sub = rec.get(part) if isinstance(rec, dict) else None
            if not sub or "file_path" not in sub:
                continue
            lms = sub.get("face_landmarks")
            image = rec.get("image") or {}
            if part == "thumbnail" and lms is None and image.get("face_landmarks") and sub.get("pixel_size"):
                scale = (
                    sub["pixel_size"][0] / image.get("pixel_size", [1024])[0]
                )  # thumbnails: downscaled image
                lms = [[x * scale, y * scale] for x, y in image["face_landmarks"]]
            meta = {"ffhq_index": int(idx)}
            if lms is not None:
                if len(lms) != 68:
                    raise ValueError(f"{path}: record {idx} ({part}) has {len(lms)} landmarks, expected 68")
                meta["landmarks"] = lms
            ann.add(sub["file_path"], meta)
    ann.sources.append(FFHQ_JSON)


def load_annotations(root: str | Path) -> Annotations:
    """Every annotation file at ``root`` merged into one :class:`Annotations` lookup."""
    root = Path(root)
    ann = Annotations()
    _read_celeba(root, ann)
    _read_ffhq(root, ann)
    if (root / SIDECAR).is_file():  # last: explicit records override dataset files
        _read_sidecar(root / SIDECAR, ann)
        ann.sources.append(SIDECAR)
    return ann


__all__ = ["ANNOTATION_FILES", "SIDECAR", "Annotations", "load_annotations"]
