"""``idforge eval``: score an exported model (or a folder of images from another tool) with a protocol.

    idforge eval --model DIR --protocol flashface --data 'out/heldout-*.tar' --judge JUDGE --out DIR

writes ``DIR/<protocol>.json``, ``DIR/<protocol>.md`` (table with the papers' published numbers as
reference rows) and ``DIR/<protocol>_grid.png``; generated batches and features are cached under
``DIR/cache`` so an interrupted run resumes. ``--out x.json`` (legacy) writes the summary JSON there
and the rest beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _load_folder(folder: Path, identities: list[str], resolution: int) -> torch.Tensor:
    """Images named ``<identity>.<ext>`` (or ``<identity>_*.<ext>``, first one) in [-1, 1], in ``identities`` order."""
    import numpy as np
    from PIL import Image

    files = {p.stem.split("_")[0] if not (folder / f"{p.stem}{p.suffix}").stem in identities else p.stem: p
             for p in sorted(folder.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")}  # fmt: skip
    missing = [i for i in identities if i not in files]
    if missing:
        raise FileNotFoundError(
            f"--images {folder}: no image for {len(missing)} identities (e.g. {missing[0]!r}); name them <identity>.png"
        )
    out = []
    for i in identities:
        im = Image.open(files[i]).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def _evaluate_edits(
    proto, edits, images, judge, vlm, clip, fid_features, lpips, detector, out, batch_size
) -> int:
    """``idforge eval --protocol edits``: score the folder ``idforge edit --batch`` wrote."""
    from idforge.data_pipeline.align import template_for
    from idforge.eval.edits import load_edit_outputs, score_edits
    from idforge.eval.features import FeatureCache, load_fid_features
    from idforge.eval.identity import load_judge
    from idforge.eval.runner import Scorers, markdown_table
    from idforge.eval.vlm import VlmJudge

    if edits is None or images is None:
        raise ValueError(
            f"--protocol {proto.name}: pass --edits BATCH (the JSONL or CSV) and --images OUT (the folder `idforge edit --batch` wrote)"
        )
    if judge is None:
        raise ValueError(f"--protocol {proto.name}: pass --judge (a face encoder) for IP")
    model = vlm or proto.vlm_model
    if model is None:
        raise ValueError(
            f"--protocol {proto.name}: pass --vlm (a local VLM folder) or set vlm_model in the protocol"
        )
    t0 = time.time()
    items = load_edit_outputs(Path(edits), Path(images))
    encoder, judge_name = load_judge(judge)
    det = None
    if detector != "template":
        from idforge.data_pipeline.detect import make_detector

        det = make_detector(detector)
    out_dir = (out.parent if out.suffix == ".json" else out) if out else Path("eval_out")
    scorers = Scorers(
        judge=encoder,
        judge_name=judge_name,
        detector=det,
        template_landmarks=torch.as_tensor(template_for(items[0].edited.shape[-1]), dtype=torch.float32),
        fid_features=load_fid_features(fid_features) if fid_features else None,
        fid_name=(fid_features or "fid").split(":")[0],
        cache=FeatureCache(out_dir / "cache" / "features"),
        vlm=VlmJudge(model, proto.vlm_question, prompt=proto.vlm_prompt, batch_size=batch_size),
    )
    if clip:
        from idforge.eval.clip_score import ClipModel

        scorers.clip = ClipModel(clip)
    if lpips is not None:
        from idforge.eval.lpips_metric import TORCHVISION_NET, load_lpips

        net, _, path = (
            str(lpips).partition(":") if str(lpips).split(":")[0] in TORCHVISION_NET else ("", "", lpips)
        )
        scorers.lpips = load_lpips(path, net=net or "alex")
    records, summary = score_edits(items, proto, scorers)
    result = {
        "protocol": proto.name,
        "judge": judge_name,
        "detector": "template landmarks (no detection)" if det is None else f"{detector} detector",
        "vlm": str(model),
        "vlm_question": proto.vlm_question,
        "success_threshold": proto.success_threshold,
        "rows": {"edits": summary},
        "edits": records,
        "seconds": round(time.time() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{proto.name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{proto.name}.md").write_text(markdown_table(result, proto))
    if out is not None and out.suffix == ".json":
        out.write_text(json.dumps(result, indent=2))
    print((out_dir / f"{proto.name}.md").read_text())
    return 0


def evaluate(
    model: Path | None = None,
    shards: str | None = None,
    data: str | None = None,
    protocol: str = "diffid",
    judge: Path | None = None,
    images: Path | None = None,
    out: Path | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    max_identities: int | None = None,
    clip: str | None = None,
    fid_features: str | None = None,
    detector: str = "template",
    batch_size: int = 8,
    edits: Path | None = None,
    vlm: str | None = None,
    lpips: str | None = None,
) -> int:
    """Score an exported model (or a folder of images) with an evaluation protocol.

    Args:
        model: folder written by `idforge export` (or `idforge demo`'s export/); generates the images.
        shards: held-out identity shards: a glob (`out/heldout-*.tar`) or brace pattern (same as --data).
        data: same as --shards.
        protocol: diffid, flashface, edits, tiny-diffid, tiny-flashface (configs/eval/) or a YAML file.
        judge: face encoder that played no part in training (idforge face-encoder folder, arcface_torch
            backbone.pth or insightface .onnx); default: the model's own face encoder (not independent).
        images: score this folder (images named <identity>.png, made by another tool) instead of generating.
        out: output folder (JSON, markdown table, grid, cache); a path ending in .json writes the summary there.
        steps: sampling steps (default: the protocol's).
        guidance: classifier-free guidance scale (default: the protocol's).
        seed: sampling seed (default: the protocol's).
        max_identities: evaluate at most this many identities (default: the protocol's).
        clip: open_clip model for CLIP score (local folder or ARCH@FILE); CLIP metrics skipped without it.
        fid_features: FID features, `inception:PATH` (local torch-fidelity weights) or `clip:SPEC`;
            FID/FIQ skipped without it.
        detector: how faces in scored images are located: `template` (the aligned-crop template, every
            image counts as detected), `insightface` or `dlib` (undetected faces are counted).
        batch_size: images per sampling batch (and per VLM forward).
        edits: edit protocols: the JSONL or CSV given to `idforge edit --batch` (its optional references column: IP against their mean embedding); --images is its --out folder.
        vlm: edit protocols: local VLM folder (or cached hub name) for the yes/no score; default the
            protocol's vlm_model.
        lpips: edit protocols: LPIPS backbone, a torchvision checkpoint as `alex:PATH` (default net,
            alexnet-owt-7be5be79.pth), `vgg:PATH` or `squeeze:PATH`; LPIPS skipped without it.
    """
    from idforge.data_pipeline.align import template_for
    from idforge.eval.features import FeatureCache, load_fid_features
    from idforge.eval.groups import load_groups
    from idforge.eval.identification import face_similarity
    from idforge.eval.identity import embed_faces, load_judge
    from idforge.eval.protocols import load_protocol
    from idforge.eval.runner import (
        Scorers,
        generate_images,
        generation_steps,
        real_ceiling,
        save_grid,
        score_generation,
        split_groups,
        write_outputs,
    )
    from idforge.inference.export import load_pipeline
    from idforge.train.data import expand_urls
    from tqdm import tqdm

    from idforge.paths import expand_path

    t0 = time.time()
    proto = load_protocol(protocol)
    if proto.kind == "edit":
        return _evaluate_edits(
            proto, edits, images, judge, vlm, clip, fid_features, lpips, detector, out, batch_size
        )
    for key, val in (
        ("steps", steps),
        ("guidance", guidance),
        ("seed", seed),
        ("max_identities", max_identities),
    ):
        if val is not None:
            setattr(proto, key, val)
    pattern = data or shards
    if pattern is None:
        raise ValueError("idforge eval: pass the held-out identity shards with --data (or --shards)")
    if model is None and images is None:
        raise ValueError("idforge eval: pass --model (generate) or --images (score a folder)")
    if model is not None and not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (write one with `idforge export`)")
    if images is not None and not images.is_dir():
        raise FileNotFoundError(f"--images {images}: no such folder")
    pipe = None
    if model is not None:
        from idforge.inference.export import MANIFEST

        pipe = load_pipeline(model)
        manifest = json.loads((model / MANIFEST).read_text())
        res, crop = int(manifest["resolution"]), float(manifest.get("crop_scale", 1.0))
    else:
        res, crop = 0, 1.0
    groups = load_groups(expand_urls(expand_path(pattern)), res or 112)
    split = split_groups(groups, proto)
    res = res or split.targets.shape[-1]

    if judge is not None:
        encoder, judge_name = load_judge(judge)
    elif pipe is not None:
        encoder, judge_name = (
            pipe.face_encoder.eval(),
            f"{model} face encoder (trained with the model: NOT independent)",
        )
    else:
        raise ValueError("idforge eval --images: pass --judge (a face encoder) to score a folder")
    det = None
    if detector != "template":
        from idforge.data_pipeline.detect import make_detector

        det = make_detector(detector)
    out_dir = (out.parent if out.suffix == ".json" else out) if out else Path("eval_out")
    cache = FeatureCache(out_dir / "cache" / "features")
    scorers = Scorers(
        judge=encoder,
        judge_name=judge_name,
        detector=det,
        template_landmarks=torch.as_tensor(template_for(split.targets.shape[-1], crop), dtype=torch.float32),
        fid_features=load_fid_features(fid_features) if fid_features else None,
        fid_name=(fid_features or "fid").split(":")[0],
        cache=cache,
    )
    if clip:
        from idforge.eval.clip_score import ClipModel

        scorers.clip = ClipModel(clip)
    if images is not None:
        generated = {"images": _load_folder(images, split.identities, split.targets.shape[-1])}
    else:
        with tqdm(total=generation_steps(split, proto), unit="img-step", desc=f"eval {proto.name}") as bar:
            generated = generate_images(pipe, split, proto, out_dir / "cache" / "images", progress=bar.update)
    rows = {name: score_generation(imgs, split, proto, scorers, name) for name, imgs in generated.items()}
    rows["real photos (ceiling)"] = real_ceiling(split, proto, encoder)
    if pipe is not None and res != split.targets.shape[-1]:
        rows[f"real photos at {res} px (resolution ceiling)"] = real_ceiling(split, proto, encoder, res)
    target_emb = embed_faces(encoder, split.targets, split.target_landmarks)
    ref_emb = embed_faces(encoder, split.references[:, 0], split.ref_landmarks[:, 0])
    result = {
        "protocol": proto.name,
        "judge": judge_name,
        "detector": "template landmarks (no detection)" if det is None else f"{detector} detector",
        "identities": len(split.identities),
        "identities_skipped": split.skipped,
        "steps": proto.steps,
        "sampling_steps": proto.steps,
        "guidance_scale": proto.guidance,
        "seed": proto.seed,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
        "feature_cache": {"hits": cache.hits, "misses": cache.misses},
    }
    # the summary keys of earlier versions
    first = rows.get("adapter", rows.get("images", {}))
    result.update(
        fs_adapter=first.get("fs", first.get("sim_target")),
        fs_text_only=rows.get("text_only", {}).get("fs", rows.get("text_only", {}).get("sim_target")),
        fs_same_identity=face_similarity(target_emb, ref_emb)["mean"],
        fs_different=face_similarity(target_emb, ref_emb.roll(1, dims=0))["mean"],
    )
    write_outputs(out_dir, result, proto)
    grid = {"reference": split.references[:, 0], "target": split.targets, **generated}
    save_grid(out_dir / f"{proto.name}_grid.png", grid)
    if out is not None and out.suffix == ".json":
        out.write_text(json.dumps(result, indent=2))
    print((out_dir / f"{proto.name}.md").read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0
