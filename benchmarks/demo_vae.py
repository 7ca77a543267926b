"""Train a variant of the demo's VAE on an existing demo folder's photos and measure it; the VAE's knobs.

It renders the demo's SynthID training photos again (same seed: the same photos as ``idforge demo``),
aligns them as curation does, trains an ``AutoencoderKL`` of the given widths with the given
:class:`idforge.train.vae.VaeTrainConfig` fields, and prints the reconstruction L1, the alignment L1
(latents' first three channels to the pooled photo) and the training seconds. It writes OUT as a demo
folder (``shards/``, ``judge/`` and ``zoo/face_encoder`` linked from DEMO, ``zoo/vae`` the new VAE), so
``benchmarks/demo_generator.py --demo OUT`` trains and scores a generator in this VAE's latents.

    OMP_NUM_THREADS=1 python benchmarks/demo_vae.py --demo demo_out --out vae_a
    OMP_NUM_THREADS=1 python benchmarks/demo_vae.py --demo demo_out --out vae_b \\
        --channels 16 32 64 --set align_weight=0 --set decoder_noise=0
    OMP_NUM_THREADS=1 python benchmarks/demo_generator.py --demo vae_b --steps 500 \\
        --set 'vae_channels=[16,32,64]' --train-identities 0 --out gen_b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, type=Path, help="an idforge demo folder (shards/, zoo/, judge/)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--channels", type=int, nargs="+", default=None, help="VAE widths (default: the demo's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a VaeTrainConfig field")
    args = ap.parse_args()

    from demo_generator import parse_set  # this folder is on sys.path when run as a script
    from idforge.data_pipeline.synthid import SynthID
    from idforge.launch.demo import DemoConfig
    from idforge.launch.demo_models import untrained_vae, vae_training_images
    from idforge.train.vae import fit_vae

    cfg = DemoConfig()
    channels = tuple(args.channels or cfg.vae_channels)
    train_cfg = replace(cfg.vae_train, **parse_set(args.set))
    synth = SynthID(cfg.synthid_config())
    renders = {(s.identity, int(s.key.rsplit("_", 1)[1])): s for s in synth.samples()}
    images = vae_training_images(cfg, renders, synth.train_ids)
    vae = untrained_vae(cfg, channels)
    t0 = time.perf_counter()
    fig = fit_vae(vae, images, train_cfg)
    fig["seconds"] = round(time.perf_counter() - t0, 1)
    fig.update(
        channels=list(channels), train=asdict(train_cfg), params=sum(p.numel() for p in vae.parameters())
    )

    out = args.out
    (out / "zoo").mkdir(parents=True, exist_ok=True)
    for link, target in (
        (out / "shards", args.demo / "shards"),
        (out / "judge", args.demo / "judge"),
        (out / "zoo" / "face_encoder", args.demo / "zoo" / "face_encoder"),
    ):
        if not link.exists():
            os.symlink(target.resolve(), link)
    shutil.rmtree(out / "zoo" / "vae", ignore_errors=True)
    vae.save_pretrained(out / "zoo" / "vae")
    (out / "vae.json").write_text(json.dumps(fig, indent=2))
    print(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
