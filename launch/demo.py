"""``idforge demo``: the whole flow on built-in data and tiny models, offline, on a CPU.

render SynthID -> train a face encoder (IResNet + ArcFace margin head) on the train identities ->
curate into webdataset shards (align with the provided landmarks, embed, shards + manifest) ->
train the tiny identity-conditioned generator (Diff-ID adapter) with Lightning -> export ->
generate for held-out identities from one reference photo each -> FS table, image grid, JSON.

The face encoder is trained before curation because curation embeds with it (as a real run embeds
with a pretrained ArcFace). The generator diffuses in pixel space (``PixelCodec``) at 16 px and
predicts x0 so the demo fits in minutes on two cores; the same code runs with SD1.5's VAE. Identity
inputs are dropped for 10% of the training samples, so sampling can use classifier-free guidance
(Ho & Salimans 2022) against the null conditioning, as IP-Adapter-style generators do; the
text-only baseline runs through the same sampler.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    num_identities: int = 240
    heldout_identities: int = 40
    images_per_identity: int = 8
    render_resolution: int = 64
    resolution: int = 16
    crop_scale: float = 0.8
    face_widths: tuple[int, ...] = (8, 16, 32, 64)
    face_epochs: int = 5
    face_batch_size: int = 64
    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    adapter: dict = field(
        default_factory=lambda: {"variant": "final", "input_layernorm": True, "normalize_by_length": True}
    )
    generator: str = "adapter"
    """``adapter`` (Diff-ID identity tokens), ``referencenet`` (FlashFace reference features, trained on
    groups of 1..``max_refs`` photos) or ``both``."""
    max_refs: int = 4
    """Most reference photos per training sample and at evaluation (ReferenceNet generators)."""
    reference: dict = field(
        default_factory=lambda: {"placement": "decoder", "timestep": 0, "face_mask": "none"}
    )
    """ReferenceNet options (``generator.reference`` of the training configs); ``image_size`` is the
    demo's resolution."""
    prediction_type: str = "sample"
    identity_loss: float = 0.0
    """lambda_id of the time-weighted identity loss (0: off)."""
    id_drop_prob: float = 0.1
    """Share of training samples whose identity embeddings are zeroed (the guidance's null branch)."""
    guidance_scale: float = 2.0
    sampling_steps: int = 25
    seed: int = 0
    tiny: dict = field(
        default_factory=lambda: {
            "unet_channels": (32, 64, 64),
            "unet_attention": (False, True, True),
            "cross_attention_dim": 64,
            "text_hidden": 64,
        }
    )

    @classmethod
    def quick(cls) -> DemoConfig:
        """A shorter run for tests: the same stages, small sizes."""
        return cls(
            num_identities=12,
            heldout_identities=4,
            images_per_identity=4,
            face_epochs=1,
            steps=4,
            batch_size=8,
            sampling_steps=3,
            max_refs=2,  # 4 photos per identity: 2 references + a gallery of 2
            tiny={
                "unet_channels": (16, 32),
                "unet_attention": (False, True),
                "cross_attention_dim": 32,
                "text_hidden": 32,
            },
        )


class _Clock:
    def __init__(self, report):
        self.t0 = time.perf_counter()
        self.report = report
        self.stages: dict[str, float] = {}
        self._last = self.t0

    def done(self, stage: str, msg: str = "") -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self._last, 2)
        self._last = now
        self.report(f"[{now - self.t0:6.1f}s] {stage}: {msg}")


def _aligned_arrays(synth, ids: list[int], per_id: int, size: int, scale: float):
    from idforge.data_pipeline.align import align_face

    crops, labels = [], []
    for i in ids:
        for k in range(per_id):
            s = synth.render(i, k)
            crop, _ = align_face(np.asarray(s.image), s.landmarks, size=size, scale=scale)
            crops.append(crop)
            labels.append(i)
    return np.stack(crops), np.asarray(labels)


def run_demo(out: str | Path, cfg: DemoConfig | None = None, report=print) -> dict:
    """Run every stage into ``out``; returns the figures written to ``out/demo.json``."""
    import lightning as L
    from idforge.data_pipeline.align import template_for
    from idforge.data_pipeline.synthid import SynthID, SynthIDConfig, write_synthid_folder
    from idforge.eval.benchmark import benchmark_steps, identity_benchmark
    from idforge.inference.export import export_generator, load_pipeline
    from idforge.models.face.iresnet import IResNetConfig
    from idforge.models.generator import GeneratorConfig
    from idforge.models.losses import IdentityLossConfig
    from idforge.models.zoo import TinyConfig, build_tiny
    from idforge.train.face_encoder import fit_face_encoder, verification_scores
    from idforge.train.module import IdentityDiffusionModule

    from .demo_data import curate_demo_shards, heldout_groups, shard_loader

    cfg = cfg or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = _Clock(report)

    synth_cfg = SynthIDConfig(
        num_identities=cfg.num_identities,
        images_per_identity=cfg.images_per_identity,
        resolution=cfg.render_resolution,
        heldout_identities=cfg.heldout_identities,
        seed=cfg.seed,
    )
    synth = SynthID(synth_cfg)
    write_synthid_folder(synth_cfg, out / "synthid")
    clock.done(
        "render",
        f"{len(synth)} SynthID images, {len(synth.train_ids)} train / "
        f"{len(synth.heldout_ids)} held-out identities",
    )

    crops, labels = _aligned_arrays(synth, list(synth.train_ids), cfg.images_per_identity, 112, 1.0)
    face_cfg = IResNetConfig(layers=(1, 1, 1, 1), widths=tuple(cfg.face_widths))
    with tqdm(total=cfg.face_epochs, unit="epoch", desc="face encoder") as bar:
        encoder, _ = fit_face_encoder(
            crops,
            labels,
            face_cfg,
            epochs=cfg.face_epochs,
            batch_size=cfg.face_batch_size,
            seed=cfg.seed,
            progress=lambda epoch, loss: (bar.set_postfix(loss=f"{loss:.3f}"), bar.update(1)),
        )
    encoder.eval()
    h_crops, h_labels = _aligned_arrays(synth, list(synth.heldout_ids), cfg.images_per_identity, 112, 1.0)
    ver = verification_scores(encoder, h_crops, h_labels)
    clock.done(
        "face encoder",
        f"held-out same-person cos {ver['same_mean']:.3f}, different-person cos {ver['diff_mean']:.3f}",
    )

    zoo = build_tiny(
        out / "zoo",
        TinyConfig(
            resolution=cfg.resolution,
            codec="pixel",
            seed=cfg.seed,
            beta_schedule="squaredcos_cap_v2",
            prediction_type=cfg.prediction_type,
            **cfg.tiny,
        ),
    )
    encoder.save_pretrained(out / "zoo" / "face_encoder")
    with tqdm(total=len(synth), unit="img", desc="curate") as bar:
        manifest = curate_demo_shards(
            out / "synthid", out / "shards", zoo.face_encoder, cfg.resolution, cfg.crop_scale, bar.update
        )
    clock.done(
        "curate",
        f"{manifest['images_accepted']} images accepted of {manifest['files_seen']} seen; "
        f"rejected {manifest['rejected']}",
    )

    id_loss = IdentityLossConfig(lambda_id=cfg.identity_loss) if cfg.identity_loss > 0 else None
    uses_reference = cfg.generator != "adapter"
    module = IdentityDiffusionModule(
        GeneratorConfig(
            zoo=zoo,
            adapter=dict(cfg.adapter) if cfg.generator != "referencenet" else {},
            train_unet=True,
            conditioning=cfg.generator,
            reference={**cfg.reference, "image_size": cfg.resolution} if uses_reference else None,
        ),
        identity_loss=id_loss,
        optimizer=lambda p: torch.optim.Adam(p, lr=cfg.lr),
        id_drop_prob=cfg.id_drop_prob,
    )
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=str(out),
    )
    loader = shard_loader(
        out / "shards",
        cfg.resolution,
        cfg.batch_size,
        cfg.seed,
        mode="group" if uses_reference else "single",
        max_refs=cfg.max_refs,
    )
    trainer.fit(module, train_dataloaders=loader)
    clock.done(
        "train generator",
        f"{cfg.steps} steps, batch {cfg.batch_size}, "
        f"final loss {float(trainer.callback_metrics.get('train/loss', float('nan'))):.4f}",
    )

    export_dir = export_generator(
        module.model, out / "export", cfg.resolution, extra={"crop_scale": cfg.crop_scale}
    )
    pipe = load_pipeline(export_dir)
    clock.done("export", str(export_dir))

    groups = heldout_groups(out / "shards", cfg.resolution)
    lms = torch.as_tensor(template_for(cfg.resolution, cfg.crop_scale), dtype=torch.float32)
    # adapter: one reference, as Diff-ID; ReferenceNet: 1 and max_refs references (FlashFace Table 3),
    # both scored against the same gallery (the photos after the first max_refs)
    settings = [1, cfg.max_refs] if uses_reference else [1]
    start = cfg.max_refs if uses_reference else 1
    groups = [g for g in groups if g.images.shape[0] > start]
    total = benchmark_steps(len(groups), cfg.sampling_steps, per_identity=uses_reference) * len(settings)
    by_refs = {}
    with tqdm(total=total, unit="step", desc="generate") as bar:
        for n in settings:
            by_refs[n] = identity_benchmark(
                pipe,
                groups,
                pipe.face_encoder,
                steps=cfg.sampling_steps,
                guidance_scale=1.0 if uses_reference else cfg.guidance_scale,
                reference_guidance_scale=cfg.guidance_scale,
                seed=cfg.seed,
                generated_landmarks=lms,
                progress=bar.update,
                num_refs=n,
                gallery_start=start,
            )
    figures, images = dict(by_refs[settings[-1]][0]), by_refs[settings[-1]][1]
    if uses_reference:
        figures["by_refs"] = {n: f for n, (f, _) in by_refs.items()}
    clock.done("generate + evaluate", f"{len(groups)} held-out identities")

    _save_grid(images, out / "demo_grid.png")
    figures.update(
        steps=cfg.steps,
        seconds=round(time.perf_counter() - clock.t0, 1),
        stages=clock.stages,
        face_encoder=ver,
        config=asdict(cfg),
    )
    (out / "demo.json").write_text(json.dumps(figures, indent=2, default=str))
    return figures


def _save_grid(images: dict[str, torch.Tensor], path: Path, rows: int = 8) -> None:
    from torchvision.utils import save_image

    n = min(rows, images["reference"].shape[0])
    cols = [images[k][:n] for k in ("reference", "adapter", "text_only")]
    grid = torch.stack(cols, dim=1).flatten(0, 1)  # (n*3, 3, H, W): rows = identities
    grid = torch.nn.functional.interpolate(
        (grid + 1) / 2, scale_factor=max(1, 64 // grid.shape[-1]), mode="nearest"
    )
    save_image(grid, path, nrow=3, padding=2)


def format_table(fig: dict) -> str:
    by_refs = fig.get("by_refs")
    if by_refs:
        rows = [(f"generated from {n} reference(s)", f["fs_adapter"]) for n, f in by_refs.items()]
        rows += [(f"  Paste, {n} reference(s)", f["flashface"]["paste"]) for n, f in by_refs.items()]
    else:
        rows = [("adapter (generated from 1 reference)", fig["fs_adapter"])]
    rows += [
        (
            "text-only (no references)" if by_refs else "text-only (identity input zeroed)",
            fig["fs_text_only"],
        ),
        ("same identity, real photos (ceiling)", fig["fs_same_identity"]),
        ("different identities (floor)", fig["fs_different"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"FS on {fig['heldout_identities']} held-out identities (cosine of face-encoder embeddings)",
        f"{'':<{width}}  FS",
    ]
    lines += [f"{name:<{width}}  {value:+.3f}" for name, value in rows]
    gap = f"gap {fig['num_refs']} reference(s) - text-only" if by_refs else "gap adapter - text-only"
    lines.append(f"{gap:<{width}}  {fig['fs_adapter'] - fig['fs_text_only']:+.3f}")
    return "\n".join(lines)


__all__ = ["DemoConfig", "format_table", "run_demo"]
