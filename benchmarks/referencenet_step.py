"""Benchmark: one FlashFace training step (main UNet + Face ReferenceNet) at SD1.5 sizes, 512 px target.

Random weights, no download: the main UNet is diffusers' ``UNet2DConditionModel`` default
structure (SD1.5: 320/640/1280/1280, 2 layers per block, 8 heads) with 768-d cross-attention and
``conv_in`` widened by the face-mask channel; the ReferenceNet is its copy. One step = encode N
reference latents (28 x 28, i.e. 224 px crops) through the ReferenceNet, predict the noise of the
64 x 64 target latent with reference attention at the decoder (mid + up) placement, MSE,
backward through both UNets (plus an Adam step with ``--adam``). Each setting (gradient
checkpointing off / on) runs in its own process, so the CPU peak resident set is that setting's own.

    python benchmarks/referencenet_step.py --device cpu --batch 1 --steps 1 --warmup 0
    python benchmarks/referencenet_step.py --device cuda --batch 8 --steps 5 --precision bf16 --adam
    python benchmarks/referencenet_step.py --device cuda --max-batch --precision bf16 --adam

``--width 0.5`` scales every block width (for small machines; say so when quoting its figures).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(args, device):
    from diffusers import UNet2DConditionModel
    from idforge.models.face_mask import widen_conv_in
    from idforge.models.referencenet import ReferenceNet, ReferenceNetConfig

    widths = tuple(max(32, round(c * args.width / 32) * 32) for c in (320, 640, 1280, 1280))  # GroupNorm(32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=widths, cross_attention_dim=768)  # SD1.5 structure
    ref = ReferenceNet.from_unet(unet, ReferenceNetConfig(placement=args.placement))
    widen_conv_in(unet, 1)
    ref.attach(unet)
    unet.to(device).train()
    ref.to(device).train()
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
        ref.unet.enable_gradient_checkpointing()
    return unet, ref


def make_step(unet, ref, args, batch, device, dtype):
    from idforge.models.face_mask import box_mask, face_mask_input

    params = [p for p in list(unet.parameters()) + list(ref.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-5) if args.adam else None  # FlashFace sec. 4.1
    mask = box_mask(
        torch.tensor([[128.0, 96.0, 384.0, 416.0]], device=device).expand(batch, 4), (512, 512), (64, 64)
    )

    def step():
        noisy = torch.randn(batch, 4, 64, 64, device=device)
        refs = torch.randn(batch, args.refs, 4, 28, 28, device=device)
        text = torch.randn(batch, 77, 768, device=device)
        empty = torch.randn(1, 77, 768, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            features = ref.encode_references(refs, empty)
            pred = unet(
                face_mask_input(noisy, mask),
                t,
                encoder_hidden_states=text,
                cross_attention_kwargs={"reference": features},
            ).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noisy)
        loss.backward()
        if opt is not None:
            opt.step()
        opt.zero_grad(set_to_none=True) if opt is not None else [setattr(p, "grad", None) for p in params]

    return step


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if device.type == "cpu" and args.max_memory_gb:
        limit = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # fail with an error, not the OOM killer
    unet, ref = build(args, device)
    params = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in ref.parameters())

    def run(batch: int) -> tuple[float, float]:
        step = make_step(unet, ref, args, batch, device, dtype)
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
        return (time.perf_counter() - t0) / args.steps, peak

    result = {"params_M": params / 1e6}
    if args.max_batch:
        batch, best = 1, None
        while batch <= 1024:
            try:
                dt, peak = run(batch)
            except torch.OutOfMemoryError:
                break
            best = {"batch": batch, "s_per_step": dt, "peak_GiB": peak}
            batch *= 2
            torch.cuda.empty_cache()
        result["largest_batch"] = best
    else:
        dt, peak = run(args.batch)
        result.update(batch=args.batch, s_per_step=dt, peak_GiB=peak)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--refs", type=int, default=4, help="references per sample (N)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--placement", choices=["decoder", "encoder", "both"], default="decoder")
    ap.add_argument("--width", type=float, default=1.0, help="scale of the SD1.5 block widths")
    ap.add_argument("--adam", action="store_true", help="include an Adam step (and its state memory)")
    ap.add_argument("--max-batch", action="store_true", help="GPU: double the batch until out of memory")
    ap.add_argument("--max-memory-gb", type=float, default=0.0, help="CPU: address-space cap per setting")
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child-process mode
    args = ap.parse_args()
    if args.checkpointing != "both":
        args.checkpointing = args.checkpointing == "on"
        result = measure(args)
        if args.json:
            print(json.dumps(result))
            return
        print(result)
        return
    print(
        f"device {args.device}, batch {args.batch}, N = {args.refs} refs (28 x 28), 512 px target, "
        f"{args.precision}, width x{args.width}, placement {args.placement}, adam {args.adam}",
        flush=True,
    )
    for setting in ("off", "on"):
        argv = [a for a in sys.argv[1:] if not a.startswith("--checkpointing")]
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--checkpointing", setting, "--json"],
            check=False,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"gradient checkpointing {setting:<3}: failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if "largest_batch" in r:
            print(f"gradient checkpointing {setting:<3}: largest batch {r['largest_batch']}", flush=True)
        else:
            print(
                f"gradient checkpointing {setting:<3}: {r['s_per_step']:8.2f} s/step  peak {r['peak_GiB']:6.2f} GiB "
                f"({'GPU allocated' if args.device.startswith('cuda') else 'process RSS'}), "
                f"{r['params_M']:.0f}M parameters",
                flush=True,
            )
    print(
        "command: python "
        + " ".join([__file__.split("/")[-2] + "/" + __file__.split("/")[-1], *sys.argv[1:]])
    )


if __name__ == "__main__":
    main()
