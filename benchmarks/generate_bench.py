"""Benchmark: seconds per image of :class:`IdentityPipeline` at SD1.5 sizes, from N references.

Random weights built from SD1.5's configs (no download): the UNet and VAE at SD1.5's block structure
(``--width`` scales the channel widths), CLIP ViT-H/14 image tower (1024-d pooled), ArcFace
IResNet-50, a CLIP-L-sized text encoder (768-d states) and the Diff-ID adapter. One timed generation
= ``pipe(prompt, references=...)``: the identity encoded from ``--references`` aligned crops, the
stock DDIM loop (``--steps``, classifier-free guidance ``--guidance``: both branches in one batched
UNet call per step), VAE decode. Printed: seconds per image (mean over ``--repeats`` after one
warm-up call) and peak memory (GPU: peak allocated; CPU: peak process RSS so far).

    python benchmarks/generate_bench.py --device cuda --dtype fp16                        # H100, 512 px
    python benchmarks/generate_bench.py --device cpu --width 0.25 --resolution 256 --steps 5
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def scaled(base: tuple[int, ...], width: float, multiple: int = 32) -> tuple[int, ...]:
    return tuple(max(multiple, round(c * width / multiple) * multiple) for c in base)


def build_pipeline(args, folder: Path):
    """An :class:`IdentityPipeline` of random-weight components at SD1.5's structure."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from idforge.inference.components import FaceEncoderModel, IdentityAdapterModel, ImageEncoderModel
    from idforge.inference.pipeline import IdentityPipeline
    from idforge.models.tiny_tokenizer import DEFAULT_WORDS, build_clip_bpe
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    w = args.width
    unet = UNet2DConditionModel(  # SD1.5 unet/config.json structure
        sample_size=args.resolution // 8,
        block_out_channels=scaled((320, 640, 1280, 1280), w),
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
    vae = AutoencoderKL(  # SD1.5 vae/config.json structure
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=scaled((128, 256, 512, 512), w),
        layers_per_block=2,
        latent_channels=4,
        sample_size=args.resolution,
        scaling_factor=0.18215,
    )
    vocab, merges = build_clip_bpe(DEFAULT_WORDS)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77
    )
    text_encoder = CLIPTextModel(  # CLIP ViT-L/14 text tower (SD1.5's), 768-d states
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    vit_width = scaled((1280,), w, 80)[0]  # ViT-H/14: width 1280, 32 layers, head width 80
    image_encoder = ImageEncoderModel(
        embed_dim=1024,
        vision_cfg={"image_size": 224, "layers": 32, "width": vit_width, "head_width": 80, "patch_size": 14},
    )
    face_encoder = FaceEncoderModel(layers=(3, 4, 14, 3), widths=scaled((64, 128, 256, 512), w, 16))
    adapter = IdentityAdapterModel(
        adapter_config={"arcface_dim": 512, "clip_dim": 1024, "text_dim": 768, "cross_attention_dim": 768}
    )
    scheduler = DDIMScheduler(  # SD1.5 scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return IdentityPipeline(
        vae, text_encoder, tokenizer, unet, scheduler, adapter, image_encoder, face_encoder, args.resolution
    )


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--width", type=float, default=1.0, help="channel-width fraction of SD1.5's")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--references", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=1, help="images per call (prompts)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(args, Path(tmp))
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
        for name in ("unet", "vae", "text_encoder", "image_encoder", "face_encoder", "adapter")
    }
    g = torch.Generator().manual_seed(args.seed)
    refs = torch.rand(args.references, 3, args.resolution, args.resolution, generator=g) * 2 - 1

    def generate(steps: int):
        return pipe(
            ["a photo of a person"] * args.batch,
            references=refs,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="pt",
        ).images

    generate(2)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = generate(args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    assert out.shape == (args.batch, 3, args.resolution, args.resolution) and torch.isfinite(out).all()
    s_per_image = sum(times) / len(times) / args.batch
    result = {
        "s_per_image": round(s_per_image, 3),
        "peak_mem_gib": round(peak_memory_gib(device), 2),
        "params_m": {k: round(v, 1) for k, v in params.items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }
    print(
        "command: python benchmarks/generate_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    print(
        f"IdentityPipeline {args.resolution} px, width {args.width}, {args.steps} DDIM steps, "
        f"{args.references} references, guidance {args.guidance}, {args.dtype} on {result['device']}"
    )
    print(f"  s/image        {result['s_per_image']:.3f}  (mean of {args.repeats}, batch {args.batch})")
    print(
        f"  peak memory    {result['peak_mem_gib']:.2f} GiB ({'allocated' if device.type == 'cuda' else 'RSS'})"
    )
    print(f"  params (M)     {result['params_m']}")
    return result


if __name__ == "__main__":
    main()
