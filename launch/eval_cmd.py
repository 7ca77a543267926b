"""``idforge eval``: the held-out FS table of an exported model on identity shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from idforge.data_pipeline.align import template_for
from idforge.eval.benchmark import identity_benchmark
from idforge.eval.groups import load_groups
from idforge.inference.export import load_exported
from idforge.inference.sampling import SamplingConfig
from idforge.train.data import expand_urls


def run_eval(args) -> dict:
    model, manifest = load_exported(args.model)
    res = int(manifest["resolution"])
    groups = load_groups(expand_urls(args.shards), res, args.max_identities)
    if len(groups) < 2:
        raise ValueError(f"{args.shards}: need at least 2 identities with 2 photos each, found {len(groups)}")
    lms = torch.as_tensor(template_for(res, float(manifest.get("crop_scale", 1.0))), dtype=torch.float32)
    sampling = SamplingConfig(steps=args.steps, seed=args.seed, guidance_scale=args.guidance)
    fig, _ = identity_benchmark(model, groups, model.face_encoder, sampling, generated_landmarks=lms)
    fig.update(sampling_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    if args.out:
        Path(args.out).write_text(json.dumps(fig, indent=2))
    return fig
