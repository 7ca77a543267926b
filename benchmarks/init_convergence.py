"""Which adapter initialisation converges faster on SynthID: the paper's or ``text_start``.

Diff-ID replaces the UNet's text context by the adapter's output (eq. 14-15), so a freshly
initialised adapter hands a pretrained UNet a near-constant context and the generator starts out
unconditional. ``adapter.text_start`` (models/adapter.py) starts the context at the text states
instead. This script measures the difference on the demo's data in two stages:

1. *pretrain*: the demo's tiny UNet is trained on SynthID images with their captions alone (a plain
   text-to-image fine-tune, the stand-in for Stable Diffusion's pretraining);
2. *attach*: from that UNet, the Diff-ID generator (adapter + UNet fine-tune, the demo's settings)
   is trained twice with the same seed and data order, once per initialisation, and evaluated
   during training: the mean training loss per window of steps and held-out FS (adapter and
   text-only, the demo's scorer) at the chosen steps.

    idforge demo --out runs/demo                         # once: SynthID shards, tiny zoo, face encoder
    python benchmarks/init_convergence.py --data runs/demo [--pretrain-steps 300] [--steps 300]
        [--eval-at 0 50 100 300] [--out runs/init_convergence.json]

Prints one table per initialisation and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

INITS = {
    "paper": {"variant": "final", "input_layernorm": True, "normalize_by_length": True},
    "text_start": {
        "variant": "final",
        "input_layernorm": True,
        "normalize_by_length": True,
        "text_start": True,
        "final_activation": False,
    },
}


def _demo_parts(data: Path):
    """The demo folder's zoo spec, train loader factory, held-out groups and resolution."""
    from idforge.models.zoo import ZooSpec

    cfg = json.loads((data / "demo.json").read_text())["config"]
    spec = ZooSpec(**json.loads((data / "zoo" / "zoo_spec.json").read_text()))
    return spec, cfg


def pretrain_text_unet(spec, cfg: dict, data: Path, steps: int, lr: float, seed: int, out: Path):
    """Stage 1: fine-tune the UNet on (image, caption) pairs alone; returns the zoo spec using it."""
    from idforge.launch.demo_data import shard_loader
    from idforge.models.generator import GeneratorConfig, IdentityGenerator
    from idforge.models.losses import diffusion_target

    torch.manual_seed(seed)
    model = IdentityGenerator.from_config(GeneratorConfig(zoo=spec, adapter=dict(INITS["paper"])))
    unet, sched = model.unet, model.scheduler
    unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    alphas = sched.alphas_cumprod
    losses, it = [], iter(shard_loader(data / "shards", cfg["resolution"], cfg["batch_size"], seed))
    for _ in range(steps):
        batch = next(it)
        latents = model.codec.encode(batch["image"])
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        text = model.encode_text(batch["caption"])
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(
            pred, diffusion_target(noise, latents, t, alphas, model.prediction_type)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    folder = out / "unet"
    if folder.exists():
        shutil.rmtree(folder)
    unet.save_pretrained(folder)
    from dataclasses import replace

    return replace(spec, unet=str(folder)), losses


class _Recorder:
    """Lightning callback: the loss of every step and the demo's FS figures at chosen steps."""

    def __init__(self, eval_at: set[int], evaluate):
        import lightning as L

        class _CB(L.Callback):
            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                self.losses.append(float(outputs["loss"]))
                step = trainer.global_step
                if step in self.eval_at:
                    self.figures[step] = evaluate(pl_module.model)

        self.callback = _CB()
        self.eval_at = eval_at
        self.losses: list[float] = []
        self.figures: dict[int, dict] = {}


def attach_and_train(init: str, spec, cfg: dict, data: Path, steps: int, lr: float, eval_at, seed: int):
    """Stage 2 for one initialisation: the demo's Diff-ID training from the pretrained UNet."""
    import lightning as L
    from idforge.data_pipeline.align import template_for
    from idforge.eval.benchmark import identity_benchmark
    from idforge.inference.export import pipeline_from_generator
    from idforge.launch.demo_data import heldout_groups, shard_loader
    from idforge.models.generator import GeneratorConfig
    from idforge.train.module import IdentityDiffusionModule

    L.seed_everything(seed, verbose=False)
    groups = heldout_groups(data / "shards", cfg["resolution"])
    lms = torch.as_tensor(template_for(cfg["resolution"], cfg["crop_scale"]), dtype=torch.float32)

    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        pipe = pipeline_from_generator(model, cfg["resolution"])
        pipe.set_progress_bar_config(disable=True)
        fig, _ = identity_benchmark(
            pipe,
            groups,
            model.face_encoder,
            steps=cfg["sampling_steps"],
            guidance_scale=cfg["guidance_scale"],
            seed=seed,
            generated_landmarks=lms,
        )
        model.train(was_training)
        return {k: round(float(fig[k]), 4) for k in ("fs_adapter", "fs_text_only")}

    module = IdentityDiffusionModule(
        GeneratorConfig(zoo=spec, adapter=dict(INITS[init]), train_unet=True),
        optimizer=lambda p: torch.optim.Adam(p, lr=lr),
        id_drop_prob=cfg["id_drop_prob"],
        seed=seed,
    )
    rec = _Recorder(set(eval_at), evaluate)
    if 0 in rec.eval_at:
        rec.figures[0] = evaluate(module.model)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[rec.callback],
    )
    trainer.fit(
        module, train_dataloaders=shard_loader(data / "shards", cfg["resolution"], cfg["batch_size"], seed)
    )
    return rec.losses, rec.figures


def _windows(losses: list[float], width: int) -> list[tuple[int, float]]:
    return [
        (min(i + width, len(losses)), sum(losses[i : i + width]) / len(losses[i : i + width]))
        for i in range(0, len(losses), width)
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="an `idforge demo --out` folder")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[0, 50, 100, 300])
    ap.add_argument("--window", type=int, default=25, help="steps per mean-loss window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("init_convergence.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in ("demo.json", "zoo/zoo_spec.json", "shards/manifest.json"):
        if not (a.data / name).is_file():
            raise SystemExit(f"{a.data / name}: missing; run `idforge demo --out {a.data}` first")
    t0 = time.perf_counter()
    spec, cfg = _demo_parts(a.data)
    work = a.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    spec, pre_losses = pretrain_text_unet(spec, cfg, a.data, a.pretrain_steps, a.lr, a.seed, work)
    print(
        f"pretrain (text only): {a.pretrain_steps} steps, loss {sum(pre_losses[:25]) / 25:.4f} (first 25)"
        f" -> {sum(pre_losses[-25:]) / 25:.4f} (last 25), {time.perf_counter() - t0:.0f} s"
    )
    results = {}
    for init in INITS:
        t1 = time.perf_counter()
        losses, figures = attach_and_train(init, spec, cfg, a.data, a.steps, a.lr, a.eval_at, a.seed)
        results[init] = {
            "losses": losses,
            "windows": _windows(losses, a.window),
            "fs": figures,
            "seconds": round(time.perf_counter() - t1, 1),
        }
    print(f"\nmean training loss per {a.window}-step window (steps up to)")
    print(f"{'step':>6}" + "".join(f"{init:>14}" for init in INITS))
    for row in zip(*(results[i]["windows"] for i in INITS), strict=True):
        print(f"{row[0][0]:>6}" + "".join(f"{w[1]:>14.4f}" for w in row))
    print("\nheld-out FS (adapter / text-only; the demo's scorer)")
    print(f"{'step':>6}" + "".join(f"{init:>22}" for init in INITS))
    for step in sorted(results["paper"]["fs"]):
        cells = [results[i]["fs"].get(step, {}) for i in INITS]
        print(f"{step:>6}" + "".join(f"{c['fs_adapter']:>+11.3f} / {c['fs_text_only']:+.3f}" for c in cells))
    results.update(
        pretrain_losses=pre_losses,
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        seconds=round(time.perf_counter() - t0, 1),
    )
    a.out.write_text(json.dumps(results, indent=2))
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
