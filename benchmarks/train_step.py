"""Benchmark: one Diff-ID training step at SD1.5 sizes (512 px), with and without the identity loss.

Random weights built from SD1.5's configs (no download): UNet2DConditionModel (860M), AutoencoderKL,
the Diff-ID adapter (ViT-H pooled 1024-d CLIP + 512-d ArcFace + 77 x 768 text), IResNet-50 ArcFace.
Prints step time and peak memory per setting (GPU: peak allocated since the setting's warm-up; CPU: the
process's peak resident set so far, which only grows, so later settings include earlier ones). Usage:

    python benchmarks/train_step.py --device cuda --batch 4 --steps 10 [--precision bf16]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def build(device, dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from idforge.models.adapter import DiffIDAdapter
    from idforge.models.codec import VaeCodec
    from idforge.models.face.face_encoder import FaceEncoder
    from idforge.models.face.iresnet import IResNet, IResNetConfig

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).to(device)
    unet.enable_gradient_checkpointing()
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    codec = VaeCodec(vae.to(device, dtype))
    face = FaceEncoder(IResNet(IResNetConfig.named("r50"))).freeze().to(device, dtype)
    adapter = DiffIDAdapter(arcface_dim=512, clip_dim=1024, text_dim=768, cross_attention_dim=768).to(device)
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    return unet, codec, face, adapter, sched


def step_fn(parts, batch, device, dtype, identity: bool, face_window: int | None):
    from idforge.models.losses import IdentityLoss, IdentityLossConfig, predict_x0

    unet, codec, face, adapter, sched = parts
    idl = IdentityLoss(
        face, IdentityLossConfig(face_window=face_window, latent_scale=8, checkpoint_decoder=True)
    )
    params = list(unet.parameters()) + list(adapter.parameters())
    opt = torch.optim.Adam(params, lr=1e-5)  # Diff-ID appendix A.1, as configs/train/sd15_diffid.yaml
    lms = torch.tensor(
        [[190.0, 240.0], [322.0, 240.0], [256.0, 310.0], [200.0, 380.0], [312.0, 380.0]], device=device
    ).expand(batch, 5, 2)
    boxes = torch.tensor([[128.0, 128.0, 384.0, 448.0]], device=device).expand(batch, 4)
    alphas = sched.alphas_cumprod.to(device)

    def step():
        z0 = torch.randn(batch, 4, 64, 64, device=device)
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            cond = adapter(
                torch.randn(batch, 512, device=device),
                torch.randn(batch, 1024, device=device),
                torch.randn(batch, 77, 768, device=device),
            )
            noisy = sched.add_noise(z0, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=cond.context).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            if identity:
                x0 = predict_x0(pred, noisy, t, alphas, "epsilon")
                ref = torch.nn.functional.normalize(torch.randn(batch, 512, device=device), dim=-1)
                loss = (
                    loss
                    + idl(
                        x0_hat=x0,
                        decode=codec.decode,
                        timesteps=t,
                        landmarks=lms,
                        reference_embeds=ref,
                        boxes=boxes,
                    ).loss
                )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    parts = build(device, dtype)
    print(f"device {device}, batch {args.batch}, {args.precision}, 512 px, gradient checkpointing on")
    for name, identity, window in (
        ("denoise only", False, None),
        ("+ identity loss, 32-latent window", True, 32),
        ("+ identity loss, full decode", True, None),
    ):
        step = step_fn(parts, args.batch, device, dtype, identity, window)
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        if device.type == "cuda":
            mem, what = torch.cuda.max_memory_allocated() / 2**30, "GPU allocated"
        else:
            mem, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"
        print(f"{name:<36} {dt * 1000:8.1f} ms/step  peak {mem:6.2f} GiB ({what})", flush=True)


if __name__ == "__main__":
    main()
