"""``idforge demo``: the whole flow on built-in data and tiny models, offline, on a CPU.

render SynthID -> train a face encoder (IResNet + ArcFace margin head) on the train identities ->
curate into webdataset shards (align with the provided landmarks, embed, shards + manifest) -> train
(or load from the cache) the VAE -> train the tiny identity-conditioned generator (the identity
adapter; ``decoupled`` variant by default, the paper's ``final`` with ``--adapter_variant final``)
with Lightning -> export -> generate for
held-out identities from one reference photo each -> FS table, image grid, JSON.

The face encoder is trained before curation because curation embeds with it (as a real run embeds
with a pretrained ArcFace). The generator diffuses 64 px faces in the latents (4 x 16 x 16) of a small
``AutoencoderKL`` the demo trains on its training photos (:mod:`idforge.train.vae`; cached, so later
runs load it), through the codec, pipeline and export SD1.5 uses, and predicts x0 so the demo fits in
minutes on two cores. Identity inputs are dropped for 10% of the training samples, so sampling can use classifier-free guidance
(Ho & Salimans 2022) against the null conditioning, as IP-Adapter-style generators do; the
text-only baseline runs through the same sampler. Each training photo's identity input comes from
another photo of the same person (``reference_photo="other"``), so the caption has to carry what
differs between photos; the learning rate decays on a cosine and the EMA of the weights is exported.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from idforge.train.vae import VaeTrainConfig
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    num_identities: int = 240
    heldout_identities: int = 40
    images_per_identity: int = 8
    render_resolution: int = 64
    resolution: int = 64
    """Side of the aligned face crops the generator learns (pixels; the VAE downsamples it 4x)."""
    crop_scale: float = 0.8
    face_widths: tuple[int, ...] = (8, 16, 32, 64)
    """Conditioning face encoder: IResNet (1, 1, 1, 1) blocks of these widths."""
    judge_layers: tuple[int, ...] = (1, 2, 1, 1)
    judge_widths: tuple[int, ...] = (8, 12, 24, 48)
    """Independent judge: another IResNet depth and width, another seed, the other half of the photos."""
    face_epochs: int = 6
    face_batch_size: int = 64
    vae_channels: tuple[int, ...] = (8, 16, 32)
    """AutoencoderKL widths (three levels: 4x downsampling; 16-32-64 reconstructs a little better,
    L1 0.101 against 0.110 without the alignment, at three times the training time)."""
    vae_norm_groups: int = 2
    vae_train: VaeTrainConfig = field(default_factory=VaeTrainConfig)
    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    lr_decay: str = "cosine"
    """``constant`` or ``cosine`` (to 0 at the last step) after ``warmup_steps``."""
    warmup_steps: int = 0
    ema_decay: float = 0.99
    """EMA of the generator's weights, exported instead of the live ones (0: off)."""
    adapter: dict = field(default_factory=lambda: {"variant": "decoupled", "input_layernorm": True})
    """Adapter options. ``decoupled`` (identity tokens with their own K/V beside the untouched text path)
    transfers identity several times faster at this budget than the paper's ``final`` context
    replacement (``{"variant": "final", "input_layernorm": True, "normalize_by_length": True}``,
    ``idforge demo --adapter_variant final``); BENCHMARKS.md has both."""
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
    reference_photo: str = "other"
    """Where the adapter's identity input comes from in training: ``same`` (the target photo itself) or
    ``other`` (another photo of the person, so the caption must carry what differs between photos)."""
    prediction_type: str = "sample"
    identity_loss: float = 0.0
    """lambda_id of the time-weighted identity loss (0: off)."""
    id_drop_prob: float = 0.1
    """Share of training samples whose identity embeddings are zeroed (the guidance's null branch)."""
    text_drop_prob: float = 0.0
    """Share of training samples whose caption alone is emptied (the identity must then carry the
    person's colours, which SynthID's captions also name)."""
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

    def synthid_config(self):
        """The SynthID this demo renders (people, photos, render resolution, seed)."""
        from idforge.data_pipeline.synthid import SynthIDConfig

        return SynthIDConfig(
            num_identities=self.num_identities,
            images_per_identity=self.images_per_identity,
            resolution=self.render_resolution,
            heldout_identities=self.heldout_identities,
            seed=self.seed,
        )

    @classmethod
    def quick(cls) -> DemoConfig:
        """A shorter run for tests: the same stages, small sizes."""
        return cls(
            num_identities=12,
            heldout_identities=4,
            images_per_identity=4,
            resolution=32,
            face_epochs=1,
            vae_channels=(8, 8, 16),
            vae_train=VaeTrainConfig(steps=3, batch_size=4, crop=16),
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


def run_demo(out: str | Path, cfg: DemoConfig | None = None, report=print) -> dict:
    """Run every stage into ``out``; returns the figures written to ``out/demo.json``."""
    from idforge.data_pipeline.align import template_for
    from idforge.data_pipeline.synthid import SynthID, write_synthid_folder
    from idforge.eval.benchmark import benchmark_steps, identity_benchmark
    from idforge.inference.export import export_generator, load_pipeline
    from idforge.models.zoo import build_tiny

    from .demo_data import curate_demo_shards, heldout_groups
    from .demo_models import demo_vae, train_face_encoders
    from .demo_train import train_generator, zoo_config

    cfg = cfg or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = _Clock(report)

    synth_cfg = cfg.synthid_config()
    synth = SynthID(synth_cfg)
    write_synthid_folder(synth_cfg, out / "synthid")
    clock.done(
        "render",
        f"{len(synth)} SynthID images, {len(synth.train_ids)} train / "
        f"{len(synth.heldout_ids)} held-out identities",
    )

    renders = {(s.identity, int(s.key.rsplit("_", 1)[1])): s for s in synth.samples()}
    with tqdm(total=2 * cfg.face_epochs, unit="epoch", desc="face encoders") as bar:
        faces = train_face_encoders(
            cfg,
            renders,
            synth.train_ids,
            synth.heldout_ids,
            progress=lambda name, epoch, loss: (
                bar.set_postfix(model=name, loss=f"{loss:.3f}"),
                bar.update(1),
            ),
        )
    ver = faces["verification"]
    clock.done(
        "face encoders",
        "held-out same/different-person cos: conditioning "
        f"{ver['encoder']['same_mean']:.3f}/{ver['encoder']['diff_mean']:.3f}, judge "
        f"{ver['judge']['same_mean']:.3f}/{ver['judge']['diff_mean']:.3f}",
    )

    zoo = build_tiny(
        out / "zoo",
        zoo_config(cfg),
    )
    faces["encoder"].save_pretrained(out / "zoo" / "face_encoder")
    faces["judge"].save_pretrained(out / "judge")
    with tqdm(total=len(synth), unit="img", desc="curate") as bar:
        manifest = curate_demo_shards(
            out / "synthid", out / "shards", zoo.face_encoder, cfg.resolution, cfg.crop_scale, bar.update
        )
    clock.done(
        "curate",
        f"{manifest['images_accepted']} images accepted of {manifest['files_seen']} seen; "
        f"rejected {manifest['rejected']}",
    )

    with tqdm(total=cfg.vae_train.steps, unit="step", desc="VAE") as bar:
        vae, vae_fig = demo_vae(
            cfg,
            synth_cfg,
            renders,
            synth.train_ids,
            progress=lambda step, loss: (bar.set_postfix(loss=f"{loss:.3f}"), bar.update(1)),
        )
    vae.save_pretrained(out / "zoo" / "vae")
    clock.done(
        "VAE",
        ("loaded from the cache " if vae_fig["cached"] else "trained, cached in ")
        + f"{vae_fig['folder']}; reconstruction L1 {vae_fig['recon_l1']:.3f}, "
        f"latent scaling factor {vae_fig['scaling_factor']:.3f}",
    )

    uses_reference = cfg.generator != "adapter"
    module, trainer = train_generator(cfg, zoo, out / "shards", out)
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
                judges={"judge": faces["judge"]},
            )
    figures, images = dict(by_refs[settings[-1]][0]), by_refs[settings[-1]][1]
    if uses_reference:
        figures["by_refs"] = {n: f for n, (f, _) in by_refs.items()}
    figures["ceilings"] = _ceilings(pipe, faces, renders, groups, lms, start, images)
    clock.done("generate + evaluate", f"{len(groups)} held-out identities")

    _save_grid(images, out / "demo_grid.png")
    figures.update(
        steps=cfg.steps,
        seconds=round(time.perf_counter() - clock.t0, 1),
        stages=clock.stages,
        face_encoder=ver,
        vae=vae_fig,
        resolution=cfg.resolution,
        config=asdict(cfg),
    )
    (out / "demo.json").write_text(json.dumps(figures, indent=2, default=str))
    return figures


@torch.no_grad()
def _ceilings(pipe, faces: dict, renders: dict, groups, lms, start: int, images: dict) -> dict:
    """What real photos score, per encoder: at the generation resolution (the shards' crops: the
    resolution ceiling), after the VAE's round trip (the codec ceiling), and at the face encoders'
    own 112 px from the renders (the real-photo ceiling)."""
    from idforge.eval.benchmark import score_images
    from idforge.eval.identity import cosine

    from .demo_models import aligned_crops

    refs = images["reference"]
    sets = {"reference": refs}
    if pipe.vae is not None:
        sets["vae_reconstruction"] = pipe.decode_latents_to_images(pipe.encode_images(refs)).cpu()
    out = {}
    for name in ("encoder", "judge"):
        enc = faces[name]
        fig = score_images(
            enc,
            sets,
            groups,
            lms.expand(len(groups), -1, -1),
            1,
            start,
        )
        full_fs = []
        for g in groups:
            crops, _ = aligned_crops(renders, {int(g.identity.removeprefix("id"))}, 112, 1.0)
            emb = torch.from_numpy(enc.embed_uint8(crops))
            gallery = torch.nn.functional.normalize(emb[start:].mean(0), dim=-1)
            full_fs.append(float(cosine(emb[:1], gallery[None])))
        out[name] = {
            "generation_resolution": fig["fs_same_identity"],
            "full_resolution": sum(full_fs) / len(full_fs),
            "top1_generation_resolution": fig["identification"]["reference"]["top1"],
        }
        if "vae_reconstruction" in sets:
            out[name]["vae_reconstruction"] = fig["fs_vae_reconstruction"]
            out[name]["top1_vae_reconstruction"] = fig["identification"]["vae_reconstruction"]["top1"]
    return out


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
    """FS and top-1 identification under the conditioning encoder and the independent judge."""
    judge = fig["judges"]["judge"]
    by_refs = fig.get("by_refs")
    ceil = fig["ceilings"]

    def row(name, key, ident=None):
        return (
            name,
            fig[key],
            judge[key],
            fig["identification"].get(ident or key[3:], {}).get("top1"),
            judge["identification"].get(ident or key[3:], {}).get("top1"),
        )

    if by_refs:
        rows = []
        for n, f in by_refs.items():
            j = f["judges"]["judge"]
            rows.append(
                (
                    f"generated from {n} reference(s)",
                    f["fs_adapter"],
                    j["fs_adapter"],
                    f["identification"]["adapter"]["top1"],
                    j["identification"]["adapter"]["top1"],
                )
            )
            rows.append(
                (f"  Paste, {n} reference(s)", f["flashface"]["paste"], j["flashface"]["paste"], None, None)
            )
        rows.append(row("text-only (no references)", "fs_text_only"))
    else:
        rows = [
            row("adapter (generated from 1 reference)", "fs_adapter"),
            row("text-only (identity input zeroed)", "fs_text_only"),
        ]
    c, cj = ceil["encoder"], ceil["judge"]
    rows.append(
        row(f"real photos at {fig['resolution']} px (resolution ceiling)", "fs_same_identity", "reference")
    )
    if "vae_reconstruction" in c:
        rows.append(
            (
                "real photos through the VAE (codec ceiling)",
                c["vae_reconstruction"],
                cj["vae_reconstruction"],
                c["top1_vae_reconstruction"],
                cj["top1_vae_reconstruction"],
            )
        )
    rows += [
        (
            "real photos at 112 px (real-photo ceiling)",
            c["full_resolution"],
            cj["full_resolution"],
            None,
            None,
        ),
        ("different identities (floor)", fig["fs_different"], judge["fs_different"], None, None),
    ]
    gap = f"gap {fig['num_refs']} reference(s) - text-only" if by_refs else "gap adapter - text-only"
    rows.append(
        (
            gap,
            fig["fs_adapter"] - fig["fs_text_only"],
            judge["fs_adapter"] - judge["fs_text_only"],
            None,
            None,
        )
    )
    width = max(len(r[0]) for r in rows)

    def cell(v, pct=False):
        if v is None:
            return f"{'':>8}"
        return f"{100 * v:7.1f}%" if pct else f"{v:+8.3f}"

    chance = fig["identification"]["adapter"]["chance_top1"]
    lines = [
        (
            f"{fig['heldout_identities']} held-out identities; FS = cosine of face embeddings to the person's "
            f"other photos; top-1 = identified among the {fig['heldout_identities']} (chance {100 * chance:.1f}%)"
        ),
        f"{'':<{width}}  {'FS':>8} {'FS':>8}   {'top-1':>8} {'top-1':>8}",
        f"{'':<{width}}  {'encoder':>8} {'judge':>8}   {'encoder':>8} {'judge':>8}",
    ]
    for name, a, b, t1, t2 in rows:
        lines.append(f"{name:<{width}}  {cell(a)} {cell(b)}   {cell(t1, True)} {cell(t2, True)}")
    lines.append(
        "encoder: the face encoder the generator conditions on; judge: an independent one (another "
        "architecture and seed, trained on the other half of the photos)"
    )
    return "\n".join(lines)


__all__ = ["DemoConfig", "format_table", "run_demo"]
