"""Run an evaluation protocol: generate (or read) images, score them, write JSON + markdown + a grid.

:func:`generate_images` samples the protocol's images with an :class:`IdentityPipeline` (the
adapter row, and the text-only baseline with the same seeds); :func:`score_generation` scores any
(N, 3, H, W) images against the held-out photos, so a folder made by another tool
(:func:`load_image_folder`) is scored by the same code. Features go through a
:class:`~idforge.eval.features.FeatureCache` and generated images are saved per batch under
``out/images``, so an interrupted run resumes where it stopped. Library code reports progress
through a ``progress(n)`` callback (the CLI wires it to tqdm).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .features import FeatureCache, FeatureFn
from .fid import fiq, frechet_distance
from .groups import IdentityGroup
from .identification import face_similarity, flashface_similarity, identification, mean_embedding
from .identity import embed_faces, embed_generated
from .protocols import Protocol

log = logging.getLogger(__name__)
PERCENT = ("fs", "ip", "sim_target", "sim_ref", "paste")  # papers print these cosines x 100


@dataclass
class Scorers:
    """The feature extractors of one evaluation run (None: metric not computed)."""

    judge: torch.nn.Module
    judge_name: str
    detector: object | None = None  # idforge.data_pipeline.detect.Detector
    template_landmarks: torch.Tensor | None = None  # (5, 2) when no detector
    clip: object | None = None  # idforge.eval.clip_score.ClipModel
    fid_features: FeatureFn | None = None
    fid_name: str = "fid"
    vlm: object | None = None  # idforge.eval.vlm.VlmJudge (edit protocols)
    lpips: torch.nn.Module | None = None  # idforge.eval.lpips_metric.load_lpips (edit protocols)
    cache: FeatureCache = field(default_factory=lambda: FeatureCache(None))


@dataclass
class Split:
    """Per identity: references (R photos), target (held-out photo) and its caption."""

    identities: list[str]
    references: torch.Tensor  # (N, R, 3, H, W)
    ref_landmarks: torch.Tensor  # (N, R, 5, 2)
    targets: torch.Tensor  # (N, 3, H, W)
    target_landmarks: torch.Tensor  # (N, 5, 2)
    prompts: list[str]
    skipped: int


def split_groups(groups: list[IdentityGroup], protocol: Protocol) -> Split:
    """First R photos are references, the next one the target; identities with fewer are skipped."""
    need = protocol.references + max(protocol.targets, 1)
    keep = [g for g in groups if g.images.shape[0] >= need][: protocol.max_identities]
    if len(keep) < 2:
        raise ValueError(
            f"protocol {protocol.name} needs at least 2 identities with {need} photos each, found {len(keep)}"
        )
    r = protocol.references
    return Split(
        identities=[g.identity for g in keep],
        references=torch.stack([g.images[:r] for g in keep]),
        ref_landmarks=torch.stack([g.landmarks[:r] for g in keep]),
        targets=torch.stack([g.images[r] for g in keep]),
        target_landmarks=torch.stack([g.landmarks[r] for g in keep]),
        prompts=[g.captions[r] for g in keep],
        skipped=len(groups) - len(keep),
    )


def generation_steps(split: Split, protocol: Protocol) -> int:
    """Denoising steps :func:`generate_images` runs (a progress total)."""
    return (2 if protocol.baseline else 1) * len(split.identities) * protocol.steps


@torch.no_grad()
def generate_images(
    pipe, split: Split, protocol: Protocol, image_dir: Path | None = None, progress: Callable | None = None
) -> dict[str, torch.Tensor]:
    """{"adapter": (N, 3, H, W), "text_only": ...} in [-1, 1]; batches already in ``image_dir`` are reused."""
    from idforge.inference.pipeline import IdentityEmbeds

    rows = ["adapter", "text_only"] if protocol.baseline else ["adapter"]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in rows}
    n, bs = len(split.identities), protocol.batch_size
    for i in range(0, n, bs):
        sl = slice(i, min(i + bs, n))
        ids = [
            pipe.encode_identity(split.references[j], split.ref_landmarks[j])
            for j in range(sl.start, sl.stop)
        ]
        embeds = IdentityEmbeds(torch.cat([e.arcface for e in ids]), torch.cat([e.clip for e in ids]))
        for row in rows:
            path = image_dir / f"{row}-{protocol.seed}-{i:05d}.pt" if image_dir else None
            if path is not None and path.is_file():
                out[row].append(torch.load(path, weights_only=True))
                if progress:
                    progress(protocol.steps * (sl.stop - sl.start))
                continue
            step_cb = None
            if progress:

                def step_cb(p, step, t, kw, _b=sl.stop - sl.start):
                    progress(_b)
                    return kw

            gen = torch.Generator(device="cpu").manual_seed(protocol.seed + i)
            imgs = pipe(
                prompt=split.prompts[sl],
                identity=embeds,
                adapter_scale=1.0 if row == "adapter" else 0.0,
                num_inference_steps=protocol.steps,
                guidance_scale=protocol.guidance,
                generator=gen,
                output_type="pt",
                callback_on_step_end=step_cb,
            ).images
            imgs = (imgs.float().cpu() * 2 - 1).clamp(-1, 1)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(imgs, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
            out[row].append(imgs)
    return {k: torch.cat(v) for k, v in out.items()}


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)


def identity_metrics(gen: torch.Tensor, split: Split, protocol: Protocol, judge: torch.nn.Module) -> dict:
    """Identity metrics for judge embeddings (N, D) of the scored images (NaN rows: undetected).

    FS is to the first reference, IP and the identification gallery use the mean of an identity's
    references, FlashFace's Sim_Target / Sim_Ref / Paste use the held-out target and the references.
    """
    n, r = split.references.shape[:2]
    refs = embed_faces(judge, split.references.flatten(0, 1), split.ref_landmarks.flatten(0, 1)).view(
        n, r, -1
    )
    gallery = torch.stack([mean_embedding(refs[i]) for i in range(n)])
    m = set(protocol.metrics)
    fig: dict = {"images": n, "undetected": int(torch.isnan(gen).any(-1).sum())}
    if m & {"fs", "fiq"}:
        fig["fs"] = face_similarity(gen, refs[:, 0])["mean"]
    if "ip" in m:
        fig["ip"] = face_similarity(gen, gallery)["mean"]
    if "identification" in m:
        fig.update({f"id_{k}": v for k, v in identification(gen, gallery).items()})
    if m & {"sim_target", "sim_ref", "paste"}:
        target = embed_faces(judge, split.targets, split.target_landmarks)
        fig.update({k: v for k, v in flashface_similarity(gen, target, refs).items() if k in m})
    return fig


def score_generation(
    images: torch.Tensor, split: Split, protocol: Protocol, scorers: Scorers, name: str
) -> dict:
    """The protocol's metrics for images (N, 3, H, W) in [-1, 1], one per identity of ``split``."""
    images = _resize(images, split.targets.shape[-1])
    gen, _found = embed_generated(scorers.judge, images, scorers.detector, scorers.template_landmarks)
    fig = identity_metrics(gen, split, protocol, scorers.judge)
    m = set(protocol.metrics)
    if m & {"clip", "clip_image"} and scorers.clip is not None:
        from .clip_score import clip_score

        img_f = scorers.cache.get(f"clip-{name}", images, scorers.clip.image_features)
        if "clip" in m:
            fig["clip"] = float(clip_score(img_f, scorers.clip.text_features(split.prompts)).mean())
        if "clip_image" in m:
            tgt_f = scorers.cache.get("clip-real", split.targets, scorers.clip.image_features)
            fig["clip_image"] = float(clip_score(img_f, tgt_f).mean())
    if m & {"fid", "fiq"} and scorers.fid_features is not None:
        real = torch.cat([split.targets, split.references.flatten(0, 1)])
        fr = scorers.cache.get(f"{scorers.fid_name}-real", real, scorers.fid_features)
        fg = scorers.cache.get(f"{scorers.fid_name}-{name}", images, scorers.fid_features)
        fig["fid"] = frechet_distance(fg, fr)
        if "fiq" in m and "fs" in fig:
            fig["fiq"] = fiq(fig["fs"], fig["fid"])
    return fig


def real_ceiling(
    split: Split, protocol: Protocol, judge: torch.nn.Module, resolution: int | None = None
) -> dict:
    """Identity metrics of the real target photos (the ceiling: a perfect rendering of the person);
    with ``resolution``, the photos are first down-sampled to it and back (the resolution ceiling)."""
    targets = split.targets
    if resolution and resolution != targets.shape[-1]:
        targets = _resize(_resize(targets, resolution), targets.shape[-1])
    return identity_metrics(embed_faces(judge, targets, split.target_landmarks), split, protocol, judge)


def markdown_table(result: dict, protocol: Protocol) -> str:
    """Rows: our scored rows, then the papers' published numbers marked as reference rows."""
    cols = [c for c in protocol.metrics if c != "identification"]
    if "identification" in protocol.metrics:
        cols += ["id_top1", "id_top5"]
    cols += ["undetected"]

    def cell(row: dict, c: str, ours: bool) -> str:
        v = row.get(c)
        if v is None:
            return "-"
        if isinstance(v, int):
            return str(v)
        if ours and (c in PERCENT or c.startswith("id_top")):
            v = 100 * v
        return f"{v:.2f}"

    lines = [
        f"Protocol `{protocol.name}`; judge: `{result['judge']}`; faces: {result['detector']}.",
        "",
        "| row | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row, c, True) for c in cols) + " |")
    for name, row in protocol.reference_rows.items():
        lines.append(f"| *reference:* {name} | " + " | ".join(cell(row, c, False) for c in cols) + " |")
    if "identification" in protocol.metrics:
        row = next(iter(result["rows"].values()))
        chance1, chance5 = 100 * row.get("id_chance_top1", 0), 100 * row.get("id_chance_top5", 0)
        lines.append("")
        lines.append(
            f"Identification among {row.get('id_identities')} identities; chance top-1 {chance1:.1f} %, "
            f"top-5 {chance5:.1f} %."
        )
    lines.append("")
    lines.append(
        "Similarities (fs, ip, sim_*, paste) and identification in percent; reference rows are the "
        "papers' published numbers on their own data and weights, not a measurement of this model."
    )
    return "\n".join(lines) + "\n"


def save_grid(path: Path, rows: dict[str, torch.Tensor], max_cols: int = 8) -> None:
    """One image row per entry (e.g. reference | target | adapter | text-only), first ``max_cols`` identities."""
    from torchvision.utils import save_image

    size = max(v.shape[-1] for v in rows.values())
    tiles = torch.cat([_resize(v[:max_cols].float(), size) for v in rows.values()])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((tiles + 1) / 2, path, nrow=min(max_cols, next(iter(rows.values())).shape[0]))


def write_outputs(out: Path, result: dict, protocol: Protocol) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{protocol.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{protocol.name}.md").write_text(markdown_table(result, protocol))
    return out / f"{protocol.name}.json", out / f"{protocol.name}.md"
