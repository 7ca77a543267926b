"""Benchmark: training throughput at SD1.5 sizes in one run, against a plain diffusers-style anchor.

Random weights from SD1.5's configs (no download). Settings, each measured after warm-up steps:

(a) anchor: eager ``UNet2DConditionModel`` fine-tune on random text states (autocast, AdamW);
(b) idforge's Diff-ID step: the Diff-ID adapter (ArcFace 512 + CLIP ViT-H pooled 1024 + 77 x 768 text)
    builds the context, UNet + adapter trained with AdamW;
(c) (b) + the time-weighted identity loss at its default knobs (``IdentityLossConfig()``: x0 decoded
    by the VAE, ArcFace IResNet-50 on the aligned crop);
(d) the FlashFace ReferenceNet config with N = 4 references (224 px crops; decoder placement, the
    face-mask channel), main UNet + ReferenceNet trained.

Printed per setting: images/s, MFU, peak memory (GPU: peak allocated; CPU: peak process RSS so far,
which only grows), and the ratios (b)/(a), (c)/(b), (d)/(b). MFU counts 3 x 803 GFLOP (forward +
backward) per image for the main UNet at 512 px (scaled by width^2 x (resolution/512)^2 at reduced
sizes) over ``--peak-tflops``; the adapter, VAE, ArcFace and ReferenceNet work is not counted, so
(c) and (d) show what their extra work costs in UNet-MFU.

    python benchmarks/train_bench.py --device cuda --batch 32 --precision bf16            # H100
    python benchmarks/train_bench.py --device cpu --width 0.25 --resolution 256 --batch 1 --steps 2
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

UNET_GFLOP_512 = 803.0  # one SD1.5 UNet forward at 512 px (64 x 64 latents), batch 1


def widths(scale: float, base=(320, 640, 1280, 1280)) -> tuple[int, ...]:
    return tuple(max(32, round(c * scale / 32) * 32) for c in base)  # multiples of GroupNorm's 32


def build_unet(args, device):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(  # SD1.5 unet/config.json structure
        sample_size=args.resolution // 8,
        block_out_channels=widths(args.width),
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    ).to(device)


def settings(args, device, dtype):
    """name -> step() closures; each builds its models when first called (so memory is per setting)."""
    from idforge.models.adapter import DiffIDAdapter

    b, lat = args.batch, args.resolution // 8

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def anchor():
        unet = build_unet(args, device).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

        def step():
            z0 = torch.randn(b, 4, lat, lat, device=device)
            noise, t = torch.randn_like(z0), torch.randint(0, 1000, (b,), device=device)
            text = torch.randn(b, 77, 768, device=device)
            with autocast():
                pred = unet(z0 + noise, t, encoder_hidden_states=text).sample
            torch.nn.functional.mse_loss(pred.float(), noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def diffid(identity: bool):
        def make():
            from idforge.models.losses import IdentityLoss, IdentityLossConfig, predict_x0

            unet = build_unet(args, device).train()
            adapter = DiffIDAdapter(arcface_dim=512, clip_dim=1024, text_dim=768, cross_attention_dim=768)
            adapter.to(device).train()
            params = list(unet.parameters()) + list(adapter.parameters())
            opt = torch.optim.AdamW(params, lr=1e-5)
            idl = face = codec = None
            if identity:
                from diffusers import AutoencoderKL, DDPMScheduler
                from idforge.models.codec import VaeCodec
                from idforge.models.face.face_encoder import FaceEncoder
                from idforge.models.face.iresnet import IResNet, IResNetConfig

                vae = AutoencoderKL(
                    block_out_channels=widths(args.width, (128, 256, 512, 512)),
                    layers_per_block=2,
                    latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4,
                )
                codec = VaeCodec(vae.to(device, dtype))
                face = FaceEncoder(IResNet(IResNetConfig.named("r50"))).freeze().to(device, dtype)
                idl = IdentityLoss(face, IdentityLossConfig(latent_scale=8))
                sched = DDPMScheduler(
                    num_train_timesteps=1000,
                    beta_schedule="scaled_linear",
                    beta_start=0.00085,
                    beta_end=0.012,
                )
                alphas = sched.alphas_cumprod.to(device)
            s = args.resolution / 512
            lms = (
                torch.tensor(
                    [[190.0, 240.0], [322.0, 240.0], [256.0, 310.0], [200.0, 380.0], [312.0, 380.0]],
                    device=device,
                )
                * s
            ).expand(b, 5, 2)

            def step():
                z0 = torch.randn(b, 4, lat, lat, device=device)
                noise, t = torch.randn_like(z0), torch.randint(0, 1000, (b,), device=device)
                with autocast():
                    cond = adapter(
                        torch.randn(b, 512, device=device),
                        torch.randn(b, 1024, device=device),
                        torch.randn(b, 77, 768, device=device),
                    )
                    noisy = z0 + noise
                    pred = unet(noisy, t, encoder_hidden_states=cond.context).sample
                    loss = torch.nn.functional.mse_loss(pred.float(), noise)
                    if identity:
                        x0 = predict_x0(pred, noisy, t, alphas, "epsilon")
                        ref = torch.nn.functional.normalize(torch.randn(b, 512, device=device), dim=-1)
                        out = idl(
                            x0_hat=x0, decode=codec.decode, timesteps=t, landmarks=lms, reference_embeds=ref
                        )
                        loss = loss + out.loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        return make

    def referencenet():
        from idforge.models.face_mask import box_mask, face_mask_input, widen_conv_in
        from idforge.models.referencenet import ReferenceNet, ReferenceNetConfig

        unet = build_unet(args, device)
        ref = ReferenceNet.from_unet(unet, ReferenceNetConfig())
        widen_conv_in(unet, 1)
        ref.attach(unet)
        unet.train()
        ref.to(device).train()
        params = [p for p in list(unet.parameters()) + list(ref.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-5)
        r = args.resolution
        box = torch.tensor([[0.25 * r, 0.19 * r, 0.75 * r, 0.81 * r]], device=device).expand(b, 4)
        mask = box_mask(box, (r, r), (lat, lat))
        ref_lat = max(8, args.ref_resolution // 8)

        def step():
            z0 = torch.randn(b, 4, lat, lat, device=device)
            noise, t = torch.randn_like(z0), torch.randint(0, 1000, (b,), device=device)
            refs = torch.randn(b, args.refs, 4, ref_lat, ref_lat, device=device)
            text = torch.randn(b, 77, 768, device=device)
            empty = torch.randn(1, 77, 768, device=device)
            with autocast():
                features = ref.encode_references(refs, empty)
                pred = unet(
                    face_mask_input(z0 + noise, mask),
                    t,
                    encoder_hidden_states=text,
                    cross_attention_kwargs={"reference": features},
                ).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return {
        "a": ("anchor: eager UNet fine-tune", anchor),
        "b": ("Diff-ID step (adapter + UNet)", diffid(False)),
        "c": ("+ identity loss (default knobs)", diffid(True)),
        "d": (f"ReferenceNet, N = {args.refs}", referencenet),
    }


def measure(make, args, device) -> tuple[float, float]:
    step = make()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    dt = (time.perf_counter() - t0) / args.steps
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return args.batch / dt, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--width", type=float, default=1.0, help="scale of every UNet/VAE block width")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--refs", type=int, default=4, help="ReferenceNet references per sample (d)")
    ap.add_argument("--ref-resolution", type=int, default=224, help="reference crop size in pixels (d)")
    ap.add_argument("--only", default="abcd", help="settings to run, e.g. 'ab'")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak (H100 SXM bf16 dense: 989)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    peak_tflops = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    torch.manual_seed(0)
    flop_per_image = 3 * UNET_GFLOP_512 * 1e9 * args.width**2 * (args.resolution / 512) ** 2
    print(
        f"device {device}, batch {args.batch}, {args.resolution} px, width x{args.width}, {args.precision}, "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    rates = {}
    for key, (name, make) in settings(args, device, dtype).items():
        if key not in args.only:
            continue
        try:
            rate, peak = measure(make, args, device)
        except torch.cuda.OutOfMemoryError:
            print(f"({key}) {name:<34} out of memory at batch {args.batch}", flush=True)
            torch.cuda.empty_cache()
            continue
        rates[key] = rate
        mfu = f"{100 * rate * flop_per_image / (peak_tflops * 1e12):5.1f} %" if peak_tflops else "  n/a"
        what = "GPU allocated" if device.type == "cuda" else "process RSS"
        print(
            f"({key}) {name:<34} {rate:8.2f} images/s  MFU {mfu}  peak {peak:6.2f} GiB ({what})", flush=True
        )
    for num, den in (("b", "a"), ("c", "b"), ("d", "b")):
        if num in rates and den in rates:
            print(f"({num})/({den}) = {rates[num] / rates[den]:.2f}")
    return rates


if __name__ == "__main__":
    main()
