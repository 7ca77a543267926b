"""Stock diffusers pipeline with idforge's exported IP-Adapter file vs IdentityPipeline, over the loop.

Builds a tiny random-weight decoupled export, loads it both ways, and prints the largest latent
difference after 1, 3, 10 and 50 DDIM steps (guidance 1) for: the stock call with one row per person
(``ip_adapter_image_embeds=[(2, 1, D)]``, which the stock pipeline repeats over its batch), idforge
against itself with z_T perturbed by 1e-6 (float amplification, the floor), and one person per stock
call (``(1, 1, D)``), then one person at guidance 2 with the null identity stacked first.

    OMP_NUM_THREADS=1 python benchmarks/ip_adapter_parity.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def main() -> None:
    from diffusers import StableDiffusionPipeline
    from idforge.inference.export import export_generator, ip_adapter_image_embeds, load_pipeline
    from idforge.inference.pipeline import IdentityEmbeds
    from idforge.models.generator import GeneratorConfig, IdentityGenerator
    from idforge.models.zoo import TinyConfig, ZooSpec, build_tiny

    tmp = Path(tempfile.mkdtemp())
    zoo = tmp / "zoo"
    build_tiny(zoo, TinyConfig())
    spec = ZooSpec(
        base=str(zoo),
        image_encoder=f"local-dir:{zoo / 'clip_image_encoder'}",
        face_encoder=str(zoo / "face_encoder"),
    )
    torch.manual_seed(0)
    model = IdentityGenerator.from_config(GeneratorConfig(zoo=spec, adapter={"variant": "decoupled"}))
    with torch.no_grad():  # trained-looking weights: every trainable tensor moved off its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    folder = export_generator(model.eval(), tmp / "model", 32)
    ours = load_pipeline(folder)
    stock = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, image_encoder=None
    )
    stock.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    stock.load_ip_adapter(
        folder, subfolder="ip_adapter", weight_name="ip-adapter.safetensors", image_encoder_folder=None
    )
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
    arc = torch.nn.functional.normalize(
        torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    clip = torch.randn(2, model.image_encoder.output_dim, generator=torch.Generator().manual_seed(2))
    prompts = ["a photo", "a face"]

    def z(eps: float = 0.0, n: int = 2) -> torch.Tensor:
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        return (x + eps * torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))[:n]

    def diff(a, b) -> str:
        return f"{float((a.images - b.images).abs().max()):.1e}"

    print("| stock call | 1 step | 3 steps | 10 steps | 50 steps |\n|---|---|---|---|---|")
    rows = {
        "two prompts, (2, 1, D)": [],
        "idforge vs itself, z_T + 1e-6": [],
        "one person per call, (1, 1, D)": [],
    }
    for steps in (1, 3, 10, 50):
        kw = {
            "num_inference_steps": steps,
            "guidance_scale": 1.0,
            "output_type": "latent",
            "height": 32,
            "width": 32,
        }
        mine = ours(prompts, identity=IdentityEmbeds(arc, clip), latents=z(), **kw)
        rows["two prompts, (2, 1, D)"].append(
            diff(
                mine,
                stock(
                    prompts, ip_adapter_image_embeds=[ip_adapter_image_embeds(arc, clip)], latents=z(), **kw
                ),
            )
        )
        rows["idforge vs itself, z_T + 1e-6"].append(
            diff(mine, ours(prompts, identity=IdentityEmbeds(arc, clip), latents=z(1e-6), **kw))
        )
        one = ours(prompts[1:], identity=IdentityEmbeds(arc[1:], clip[1:]), latents=z(n=1), **kw)
        embeds = ip_adapter_image_embeds(arc[1:], clip[1:])
        rows["one person per call, (1, 1, D)"].append(
            diff(one, stock(prompts[1:], ip_adapter_image_embeds=[embeds], latents=z(n=1), **kw))
        )
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    kw = {
        "num_inference_steps": 10,
        "guidance_scale": 2.0,
        "output_type": "latent",
        "height": 32,
        "width": 32,
    }
    embeds = ip_adapter_image_embeds(arc[1:], clip[1:], classifier_free_guidance=True)
    one = ours(prompts[1:], identity=IdentityEmbeds(arc[1:], clip[1:]), latents=z(n=1), **kw)
    print(
        "one person, guidance 2, null identity first, 10 steps:",
        diff(one, stock(prompts[1:], ip_adapter_image_embeds=[embeds], latents=z(n=1), **kw)),
    )


if __name__ == "__main__":
    main()
