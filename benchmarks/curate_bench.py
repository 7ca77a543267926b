"""Benchmark: throughput of the curation stages (not a test; random weights, never downloads).

CPU (default): images/s per stage on SynthID photos: decode, detect (provided landmarks; dlib when
the extra is installed; an insightface pack when ``--det-pack`` names one), filter, align, embed
(IResNet, ``--embed-arch``), caption (CelebA rules; tiny BLIP), and identity clustering.
``--device cuda``: faces/s of batched detection + embedding with full-size random-weight models
(an SCRFD-shaped detector: ResNet-18 trunk with stride-8/16/32 heads at 640 x 640, ~15 GFLOPs,
the order of SCRFD-10G; IResNet-100 as antelopev2's glintr100) and captions/s of BLIP-large
(ViT-L/16 at 384 px + BERT-base decoder) built from a transformers ``BlipConfig``; random weights
never emit EOS, so every caption runs the full ``--caption-tokens`` (a worst case). Usage::

    python benchmarks/curate_bench.py [--n 64] [--device cuda --batch 64 --dtype float16] [--json out.json]
    python benchmarks/curate_bench.py --full-models --dtype float32 --batch 2 --caption-batch 1   # CPU
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from torch import nn


def _rate(fn, items: int, repeat: int = 1) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return items * repeat / (time.perf_counter() - t)


def synthid_inputs(n: int, resolution: int):
    from idforge.data_pipeline.synthid import SynthID, SynthIDConfig

    sid = SynthID(
        SynthIDConfig(
            num_identities=max(2, n // 8), images_per_identity=8, resolution=resolution, heldout_identities=0
        )
    )
    samples = [sid.render(i // 8, i % 8) for i in range(n)]
    blobs = []
    for s in samples:
        buf = io.BytesIO()
        s.image.convert("RGB").save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    return samples, blobs


def cpu_stages(args) -> dict:
    from idforge.data_pipeline.align import align_face
    from idforge.data_pipeline.caption import build_tiny_blip, make_captioner
    from idforge.data_pipeline.cluster import cluster_unlabelled
    from idforge.data_pipeline.decode import decode_image
    from idforge.data_pipeline.detect import make_detector
    from idforge.data_pipeline.filters import FilterConfig, check_face
    from idforge.models.face.face_encoder import FaceEncoder
    from idforge.models.face.iresnet import IResNet, IResNetConfig

    samples, blobs = synthid_inputs(args.n, args.resolution)
    metas = [
        {"landmarks": s.landmarks, "box": s.box, "attributes": {"Male": 1, "Smiling": 1, "Young": -1}}
        for s in samples
    ]
    images = [decode_image(b) for b in blobs]
    out = {"decode": _rate(lambda: [decode_image(b) for b in blobs], len(blobs))}
    det = make_detector("landmarks")
    out["detect_landmarks"] = _rate(lambda: det.detect_batch(images, metas), len(images))
    try:
        dl = make_detector("dlib")
        out["detect_dlib"] = _rate(lambda: dl.detect_batch(images[:16]), min(16, len(images)))
    except ImportError:
        out["detect_dlib"] = None
    if args.det_pack:
        ins = make_detector("insightface", model=args.det_pack, root=args.det_root)
        out["detect_insightface"] = _rate(lambda: ins.detect_batch(images), len(images))
    dets = det.detect_batch(images, metas)
    cfg = FilterConfig(min_resolution=32, min_face_px=8, min_sharpness=1.0)
    out["filter"] = _rate(lambda: [check_face(im, d, cfg) for im, d in zip(images, dets)], len(images))
    out["align_112_and_512"] = _rate(
        lambda: [
            (align_face(im, d[0].landmarks, 112), align_face(im, d[0].landmarks, 512))
            for im, d in zip(images, dets)
        ],
        len(images),
    )
    crops = np.stack([align_face(im, d[0].landmarks, 112)[0] for im, d in zip(images, dets)])
    enc = FaceEncoder(IResNet(IResNetConfig.named(args.embed_arch))).freeze()
    out[f"embed_{args.embed_arch}"] = _rate(lambda: enc.embed_uint8(crops, batch_size=32), len(crops))
    celeba = make_captioner("celeba")
    out["caption_celeba"] = _rate(lambda: celeba.caption([None] * len(metas), metas), len(metas))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        blip = make_captioner("blip", model=str(build_tiny_blip(tmp)), batch_size=16, max_new_tokens=20)
        pil = [s.image for s in samples]
        out["caption_blip_tiny"] = _rate(lambda: blip.caption(pil), len(pil))
    emb = np.random.default_rng(0).normal(size=(args.cluster_n, 512)).astype(np.float32)
    out[f"cluster_unlabelled_{args.cluster_n}"] = _rate(
        lambda: cluster_unlabelled(emb, 0.5, chunk=4096), args.cluster_n
    )
    return out


class RandomSCRFD(nn.Module):
    """SCRFD-shaped stand-in: ResNet-18 trunk, per-stride heads (2 anchors: score, 4 distances, 10 kps)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet18

        r = resnet18(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stages = nn.ModuleList([r.layer2, r.layer3, r.layer4])  # strides 8, 16, 32
        self.heads = nn.ModuleList([nn.Conv2d(c, 2 * 15, 3, padding=1) for c in (128, 256, 512)])

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            outs.append(head(x))  # (B, 30, h, w)
        b = x.shape[0]
        flat = [o.permute(0, 2, 3, 1).reshape(b, -1, 15) for o in outs]  # (B, h*w*2, 15)
        return [f[..., :1].sigmoid() for f in flat] + [f[..., 1:5] for f in flat] + [f[..., 5:] for f in flat]


def full_model_stages(args) -> dict:
    from idforge.data_pipeline.detect import decode_scrfd
    from idforge.models.face.face_encoder import FaceEncoder
    from idforge.models.face.iresnet import IResNet, IResNetConfig
    from transformers import BlipConfig, BlipForConditionalGeneration

    dev, dtype = args.device, getattr(torch, args.dtype)
    out = {}
    det = RandomSCRFD().to(dev, dtype).eval()
    enc = FaceEncoder(IResNet(IResNetConfig.named("r100"))).freeze().to(dev, dtype)
    images = torch.randint(0, 255, (args.batch, 3, 640, 640), dtype=torch.uint8, device=dev)
    crops = torch.randint(0, 255, (args.batch, 3, 112, 112), dtype=torch.uint8, device=dev)

    @torch.no_grad()
    def detect():
        raw = det((images.to(dtype) - 127.5) / 128.0)
        raw = [r.float().cpu().numpy() for r in raw]
        for b in range(args.batch):  # CPU decode + NMS per image, as in InsightFaceDetector
            decode_scrfd([r[b] for r in raw], (640, 640), (8, 16, 32), 2, threshold=0.5)

    @torch.no_grad()
    def embed():
        enc(crops.to(dtype) / 127.5 - 1.0)

    out["detect_scrfd_shaped_640"] = _rate(detect, args.batch, args.repeat)
    out["embed_r100"] = _rate(embed, args.batch, args.repeat)
    out["detect_plus_embed_faces_per_s"] = 1.0 / (
        1.0 / out["detect_scrfd_shaped_640"] + 1.0 / out["embed_r100"]
    )
    vision = {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 384,
        "patch_size": 16,
    }
    text = {
        "vocab_size": 30524,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    }  # Salesforce/blip-image-captioning-large's config values
    blip = (
        BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).to(dev, dtype).eval()
    )
    blip.generation_config.eos_token_id = None  # random weights: run every caption to full length
    pix = torch.randn(args.caption_batch, 3, 384, 384, device=dev, dtype=dtype)
    tc = blip.config.text_config
    prompt = torch.tensor([[tc.bos_token_id, tc.sep_token_id]], device=dev).expand(
        args.caption_batch, 2
    )  # generate drops [SEP]

    @torch.no_grad()
    def caption():
        blip.generate(
            pixel_values=pix,
            input_ids=prompt,
            max_new_tokens=args.caption_tokens,
            min_new_tokens=args.caption_tokens,
        )

    out[f"blip_large_captions_per_s_{args.caption_tokens}tok"] = _rate(
        caption, args.caption_batch, args.repeat
    )
    if dev.startswith("cuda"):
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=64, help="SynthID images for the CPU stages")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--embed-arch", default="r50")
    ap.add_argument("--cluster-n", type=int, default=20000)
    ap.add_argument("--det-pack", default=None, help="insightface pack name or detector .onnx (optional)")
    ap.add_argument("--det-root", default="~/.insightface/models")
    ap.add_argument("--batch", type=int, default=64, help="GPU detection/embedding batch")
    ap.add_argument("--caption-batch", type=int, default=32)
    ap.add_argument("--caption-tokens", type=int, default=30)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--full-models", action="store_true", help="run the full-size model path on --device cpu too"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = {"device": args.device, "torch_threads": torch.get_num_threads()}
    if args.device.startswith("cuda") or args.full_models:
        result["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        result["rates"] = full_model_stages(args)
    else:
        result["rates"] = cpu_stages(args)
    for k, v in result["rates"].items():
        print(f"{k:40s} {'n/a' if v is None else f'{v:10.1f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
