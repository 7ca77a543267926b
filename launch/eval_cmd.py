"""``idforge eval``: the held-out FS table of an exported model on identity shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from idforge.data_pipeline.align import template_for
from idforge.eval.benchmark import benchmark_steps, identity_benchmark
from idforge.eval.groups import load_groups
from idforge.inference.export import load_exported
from idforge.inference.sampling import SamplingConfig
from idforge.train.data import expand_urls

from idforge.paths import expand_path


def evaluate(
    model: Path,
    shards: str,
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    max_identities: int = 200,
    out: Path | None = None,
) -> int:
    """FS table of an exported model on held-out identity shards (printed as JSON).

    Args:
        model: folder written by `idforge export` (or `idforge demo`'s export/).
        shards: held-out shards: a glob (`out/heldout-*.tar`) or brace pattern; `~` and `$VARS` expanded.
        steps: DDIM sampling steps.
        guidance: classifier-free guidance scale against the null identity (the demo uses 2.0).
        seed: sampling seed.
        max_identities: evaluate at most this many identities.
        out: also write the figures as JSON here.
    """
    from tqdm import tqdm

    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (write one with `idforge export`)")
    generator, manifest = load_exported(model)
    res = int(manifest["resolution"])
    groups = load_groups(expand_urls(expand_path(shards)), res, max_identities)
    if len(groups) < 2:
        raise ValueError(f"{shards}: need at least 2 identities with 2 photos each, found {len(groups)}")
    lms = torch.as_tensor(template_for(res, float(manifest.get("crop_scale", 1.0))), dtype=torch.float32)
    sampling = SamplingConfig(steps=steps, seed=seed, guidance_scale=guidance)
    with tqdm(total=benchmark_steps(len(groups), sampling), unit="step", desc="eval sampling") as bar:
        fig, _ = identity_benchmark(
            generator, groups, generator.face_encoder, sampling, generated_landmarks=lms, progress=bar.update
        )
    fig.update(sampling_steps=steps, guidance_scale=guidance, seed=seed)
    if out:
        out.write_text(json.dumps(fig, indent=2))
    print(json.dumps(fig, indent=2))
    return 0
