"""Edit-protocol aggregation (FlowID / FINEdits, SPEC sec. 8): which edits count, and the means.

Each edit record carries its chain id, its step in the chain, its VLM score and per-edit quality
metrics (IP, LPIPS, ...). An edit succeeds when its VLM score is below ``threshold`` (0.5; FlowID's "Is this person's face
injured?"), or above it for a question about what the edit adds (``success="above"``); IP / LPIPS
and the set-level FID / CMMD are computed over successful edits only, and a sequence of edits stops
at its first failure (later steps of that chain are not scored at all).

:func:`score_edits` computes the records from images: the VLM score of each edited image
(:class:`idforge.eval.vlm.VlmJudge`, FlowID eq. 6), IP, LPIPS to the input, CLIP score to the target
prompt, then FID / CMMD of the successful edits against a real set (by default the input photos;
FlowID uses 14,000 FFHQ images).

IP is the ArcFace cosine of the edited face to the mean embedding of the person's other photos
(FlowID sec. 4.1, InjuredFaces: "a reference embedding a by averaging the embeddings of its
uninjured portraits") when the batch row lists ``references``, else to the input photo (Diff-ID's
FS against one source); each record's ``ip_against`` says which, and the summary counts both.
References whose face is not found are left out of the mean; a row whose references all fail falls
back to the input and is counted (``ip_references_failed``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def _walk_chains(records: list[dict], threshold: float, success: str) -> tuple[list[dict], list[dict], int]:
    """(successful, failed, count not scored) with each chain cut at its first failed step."""
    if success not in ("below", "above"):
        raise ValueError(f"vlm_success {success!r}: choose 'below' (removal) or 'above' (addition)")
    chains: dict = defaultdict(list)
    for r in records:
        chains[r.get("chain", id(r))].append(r)
    kept, failed, cut = [], [], 0
    for steps in chains.values():
        steps = sorted(steps, key=lambda r: r.get("step", 0))
        for i, r in enumerate(steps):
            if (r["vlm"] >= threshold) if success == "below" else (r["vlm"] < threshold):
                failed.append(r)
                cut += len(steps) - i - 1
                break
            kept.append(r)
    return kept, failed, cut


def successful_edits(
    records: list[dict], threshold: float = 0.5, success: str = "below"
) -> tuple[list[dict], dict]:
    """(successful records, counts) with chains cut at their first failed step; an edit succeeds when
    its VLM score is below ``threshold`` (``success="below"``: the question asks about what the edit
    removes, FlowID's injuries) or at/above it (``"above"``: it asks about what the edit adds)."""
    kept, failed, cut = _walk_chains(records, threshold, success)
    return kept, {
        "edits": len(records),
        "successful": len(kept),
        "failed": len(failed),
        "not_scored_after_failure": cut,
    }


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else float("nan")


def summarize_edits(
    records: list[dict],
    threshold: float = 0.5,
    metrics: tuple[str, ...] = ("ip", "lpips"),
    every: tuple[str, ...] = ("clip",),
    success: str = "below",
) -> dict:
    """VLM mean and ``every`` metrics over every scored edit (successful or the chain's first
    failure), success rate, and ``metrics`` means over successful edits only (FlowID sec. 4.1: IP,
    LPIPS, FID, CMMD over successful edits; CLIP over all)."""
    kept, counts = successful_edits(records, threshold, success)
    scored = kept + _walk_chains(records, threshold, success)[1]
    out = dict(counts, vlm=_mean([r["vlm"] for r in scored]))
    out["success_rate"] = counts["successful"] / max(counts["edits"], 1)
    for m in metrics:
        out[m] = _mean([r[m] for r in kept if m in r])
    for m in every:
        out[m] = _mean([r[m] for r in scored if m in r])
    return out


@dataclass(frozen=True)
class ReferencePhotos:
    """A person's other photos, read from disk only when embedded: a batch of thousands of rows keeps
    paths, not (K, 3, H, W) tensors, and :func:`score_edits` keeps only each row's mean embedding."""

    paths: tuple[Path, ...]
    size: int

    def load(self) -> torch.Tensor:
        """(K, 3, size, size) in [-1, 1], cropped as the editor crops its input."""
        from idforge.inference.edit.output import load_photo

        return torch.cat([load_photo(p, self.size)[0] for p in self.paths])


@dataclass
class Edit:
    """One edited image: its chain (the input photo's sequence of edits) and step in it."""

    chain: str
    step: int
    original: torch.Tensor  # (3, H, W) in [-1, 1], the photo the chain started from
    edited: torch.Tensor  # (3, H, W) in [-1, 1]
    target: str  # the target prompt (CLIP score)
    concept: str | None = None  # fills ``{concept}`` in the VLM question
    references: torch.Tensor | ReferencePhotos | None = None
    """The person's other photos (IP): (K, 3, H, W) in [-1, 1], or read lazily from ``ReferencePhotos``."""


def _stack(images: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.stack(
        [torch.nn.functional.interpolate(x[None].float(), size=(size, size), mode="bilinear",
                                         antialias=True)[0] if x.shape[-1] != size else x.float()
         for x in images]
    )  # fmt: skip  # (N, 3, size, size)


def _reference_means(edits: list[Edit], size: int, scorers) -> dict[int, torch.Tensor | None]:
    """Mean embedding (D,) of each distinct ``references`` tensor (the steps of a chain share one),
    keyed by its ``id``, over the references whose face was found; None where none was."""
    from .identification import mean_embedding
    from .identity import embed_generated

    groups = {id(e.references): e.references for e in edits if e.references is not None}
    out = {}
    for key, g in groups.items():  # one person at a time: only the means stay in memory
        photos = g.load() if isinstance(g, ReferencePhotos) else g
        refs = _stack(list(photos), size)  # (K, 3, size, size)
        emb, ok = embed_generated(scorers.judge, refs, scorers.detector, scorers.template_landmarks)
        out[key] = mean_embedding(emb[ok]) if ok.any() else None
        if not ok.all():
            log.info(
                "IP: %d of %d reference photos without a detected face, left out", int((~ok).sum()), len(refs)
            )
    return out


def score_edits(edits: list[Edit], protocol, scorers, real: torch.Tensor | None = None) -> tuple[list, dict]:
    """(per-edit records, summary) of the edit protocol; ``scorers`` is a runner ``Scorers`` with a
    ``vlm`` judge (required: it decides which edits count), optional ``clip``, ``lpips``, FID features.

    IP is against the mean embedding of an edit's ``references`` when it has any with a detected
    face, else against its input photo; records carry ``ip_against`` and the summary its counts over
    the successful edits, plus ``ip_references_failed`` (edits whose references all went undetected).
    Edited images whose face is not found get no IP; records say ``face_found`` and the summary counts
    them (``undetected`` over all edits, ``undetected_successful`` over the successful ones)."""
    from .clip_score import clip_score
    from .cmmd import cmmd
    from .fid import frechet_distance
    from .identity import cosine, embed_generated

    if scorers.vlm is None:
        raise ValueError(
            f"protocol {protocol.name}: edits are scored by a VLM (success = VLM < "
            f"{protocol.success_threshold}); pass --vlm FOLDER or set vlm_model in the protocol"
        )
    m = set(protocol.metrics)
    size = max(e.edited.shape[-1] for e in edits)
    edited = _stack([e.edited for e in edits], size)
    original = _stack([e.original for e in edits], size)
    concepts = [e.concept or "" for e in edits] if "{concept}" in scorers.vlm.question else None
    vlm = scorers.vlm.score(edited, concepts)
    records = [
        {"index": i, "chain": e.chain, "step": e.step, "target": e.target, "vlm": float(vlm[i])}
        for i, e in enumerate(edits)
    ]
    ip_failed = 0
    if "ip" in m:
        ge, found = embed_generated(scorers.judge, edited, scorers.detector, scorers.template_landmarks)
        oe, _ = embed_generated(scorers.judge, original, scorers.detector, scorers.template_landmarks)
        for r, f in zip(records, found.tolist()):
            r["face_found"] = bool(f)
        against = ["input"] * len(edits)
        means = _reference_means(edits, size, scorers)
        for i, e in enumerate(edits):
            if e.references is None:
                continue
            if means[id(e.references)] is None:  # no reference face found: the input photo instead
                ip_failed += 1
            else:
                oe[i], against[i] = means[id(e.references)], "references"
        for r, c, a in zip(records, cosine(ge, oe).tolist(), against):
            if not math.isnan(c):  # NaN: a face not found in the edited image (or the input)
                r["ip"], r["ip_against"] = c, a
    if "lpips" in m and scorers.lpips is not None:
        from .lpips_metric import lpips_distance

        for r, d in zip(records, lpips_distance(scorers.lpips, edited, original).tolist()):
            r["lpips"] = d
    clip_f = None
    if m & {"clip", "cmmd"} and scorers.clip is not None:
        clip_f = scorers.clip.image_features(edited)
        if "clip" in m:
            scores = clip_score(clip_f, scorers.clip.text_features([e.target for e in edits]))
            for r, c in zip(records, scores.tolist()):
                r["clip"] = c
    out = summarize_edits(records, protocol.success_threshold, success=protocol.vlm_success)
    kept = [
        r["index"] for r in successful_edits(records, protocol.success_threshold, protocol.vlm_success)[0]
    ]
    if "ip" in m:  # what the IP mean (successful edits) was measured against
        ips = [records[i]["ip_against"] for i in kept if "ip" in records[i]]
        out["ip_against"] = {a: ips.count(a) for a in ("references", "input")}
        out["ip_references_failed"] = ip_failed
        # edited images without a detected face: no IP, counted over every edit and over the
        # successful ones (whose IP mean they would otherwise silently leave)
        out["undetected"] = sum(not r["face_found"] for r in records)
        out["undetected_successful"] = sum(not records[i]["face_found"] for i in kept)
    real = original if real is None else real
    if "fid" in m and scorers.fid_features is not None:  # a set metric needs >= 2 successful edits
        fr = scorers.cache.get(f"{scorers.fid_name}-real", real, scorers.fid_features)
        out["fid"] = (
            frechet_distance(scorers.fid_features(edited[kept]), fr) if len(kept) > 1 else float("nan")
        )
    if "cmmd" in m and clip_f is not None:
        real_f = scorers.cache.get("clip-real", real, scorers.clip.image_features)
        out["cmmd"] = cmmd(clip_f[kept], real_f) if len(kept) > 1 else float("nan")
    return records, out


def load_edit_outputs(batch: Path, folder: Path) -> list[Edit]:
    """The edits ``idforge edit --batch BATCH --out FOLDER`` wrote: row i's chain is ``FOLDER/<i:04d>/``
    (``edited.png``, or ``edit_NN_edited.png`` per step of a sequence); the target and concept come
    from the PNG's ``idforge:edit`` text, the original from the row's ``image`` and the optional
    ``references`` from its list of the person's other photos (read when embedded), all cropped as the editor did
    (:func:`idforge.inference.edit.output.load_photo`). ``BATCH`` is JSONL or CSV
    (:func:`idforge.launch.edit_cmd.read_batch`)."""
    from idforge.inference.edit.output import load_photo
    from idforge.launch.edit_cmd import batch_path, read_batch_lines
    from PIL import Image

    if not batch.is_file():
        raise FileNotFoundError(
            f"--edits {batch}: no such file; pass the JSONL or CSV given to `idforge edit --batch`"
        )
    edits = []
    for i, (line, row) in enumerate(read_batch_lines(batch)):
        files = sorted((folder / f"{i:04d}").glob("edit_*_edited.png")) or [
            folder / f"{i:04d}" / "edited.png"
        ]
        if not files[0].is_file():
            raise FileNotFoundError(
                f"--images {folder}: no {files[0]} for line {line} of {batch}; "
                f"run `idforge edit --batch {batch} --out {folder}` first"
            )
        refs = [batch_path(p, batch) for p in row.get("references", [])]
        for p in refs:
            if not p.is_file():
                raise FileNotFoundError(
                    f"--edits {batch}: line {line}, reference photo {p} does not exist; "
                    f"fix the path (relative paths are under {batch.parent}) or drop it from 'references'"
                )
        photo = batch_path(row["image"], batch)
        references = None  # one object shared by the chain's steps: embedded once
        for step, f in enumerate(files):
            img = Image.open(f)
            info = json.loads(img.text.get("idforge:edit", "{}")) if hasattr(img, "text") else {}
            x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(
                2, 0, 1
            )
            if refs and references is None:
                references = ReferencePhotos(tuple(refs), x.shape[-1])
            edits.append(
                Edit(
                    chain=f"{i:04d}",
                    step=step,
                    original=load_photo(photo, x.shape[-1])[0][0],
                    edited=x,
                    target=info.get("target", row.get("target", "")),
                    concept=info.get("concept", row.get("concept")),
                    references=references,
                )
            )
    return edits
