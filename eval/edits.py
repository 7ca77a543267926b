"""Edit-protocol aggregation (FlowID / FINEdits, SPEC sec. 8): which edits count, and the means.

Each edit record carries its chain id, its step in the chain, its VLM score and per-edit quality
metrics (IP, LPIPS, ...). An edit succeeds when its VLM score is below ``threshold`` (0.5; FlowID's "Is this person's face
injured?"), or above it for a question about what the edit adds (``success="above"``); IP / LPIPS
and the set-level FID / CMMD are computed over successful edits only, and a sequence of edits stops
at its first failure (later steps of that chain are not scored at all).

:func:`score_edits` computes the records from images: the VLM score of each edited image
(:class:`idforge.eval.vlm.VlmJudge`, FlowID eq. 6), IP (ArcFace cosine of the edited face to the
input face), LPIPS to the input, CLIP score to the target prompt, then FID / CMMD of the successful
edits against a real set (by default the input photos; FlowID uses 14,000 FFHQ images).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


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


@dataclass
class Edit:
    """One edited image: its chain (the input photo's sequence of edits) and step in it."""

    chain: str
    step: int
    original: torch.Tensor  # (3, H, W) in [-1, 1], the photo the chain started from
    edited: torch.Tensor  # (3, H, W) in [-1, 1]
    target: str  # the target prompt (CLIP score)
    concept: str | None = None  # fills ``{concept}`` in the VLM question


def _stack(images: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.stack(
        [torch.nn.functional.interpolate(x[None].float(), size=(size, size), mode="bilinear",
                                         antialias=True)[0] if x.shape[-1] != size else x.float()
         for x in images]
    )  # fmt: skip  # (N, 3, size, size)


def score_edits(edits: list[Edit], protocol, scorers, real: torch.Tensor | None = None) -> tuple[list, dict]:
    """(per-edit records, summary) of the edit protocol; ``scorers`` is a runner ``Scorers`` with a
    ``vlm`` judge (required: it decides which edits count), optional ``clip``, ``lpips``, FID features."""
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
    if "ip" in m:
        ge, _ = embed_generated(scorers.judge, edited, scorers.detector, scorers.template_landmarks)
        oe, _ = embed_generated(scorers.judge, original, scorers.detector, scorers.template_landmarks)
        for r, c in zip(records, cosine(ge, oe).tolist()):
            if not math.isnan(c):  # NaN: a face not found in one of the two images
                r["ip"] = c
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
    """The edits ``idforge edit --batch BATCH --out FOLDER`` wrote: line i's chain is ``FOLDER/<i:04d>/``
    (``edited.png``, or ``edit_NN_edited.png`` per step of a sequence); the target and concept come
    from the PNG's ``idforge:edit`` text, the original from the line's ``image`` (cropped as the editor did)."""
    from idforge.inference.edit.output import load_photo
    from PIL import Image

    if not batch.is_file():
        raise FileNotFoundError(
            f"--edits {batch}: no such file; pass the JSONL given to `idforge edit --batch`"
        )
    rows = [json.loads(line) for line in batch.read_text().splitlines() if line.strip()]
    edits = []
    for i, row in enumerate(rows):
        files = sorted((folder / f"{i:04d}").glob("edit_*_edited.png")) or [
            folder / f"{i:04d}" / "edited.png"
        ]
        if not files[0].is_file():
            raise FileNotFoundError(
                f"--images {folder}: no {files[0]} for line {i + 1} of {batch}; "
                f"run `idforge edit --batch {batch} --out {folder}` first"
            )
        photo = Path(row["image"]).expanduser()
        photo = photo if photo.is_absolute() else batch.parent / photo
        for step, f in enumerate(files):
            img = Image.open(f)
            info = json.loads(img.text.get("idforge:edit", "{}")) if hasattr(img, "text") else {}
            x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(
                2, 0, 1
            )
            edits.append(
                Edit(
                    chain=f"{i:04d}",
                    step=step,
                    original=load_photo(photo, x.shape[-1])[0][0],
                    edited=x,
                    target=info.get("target", row.get("target", "")),
                    concept=info.get("concept", row.get("concept")),
                )
            )
    return edits
