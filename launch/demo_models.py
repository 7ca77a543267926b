"""The demo's own pretrained parts, trained on SynthID because nothing can be downloaded offline.

- Two face encoders (IResNet + ArcFace margin head) on disjoint halves of the training photos: the
  *conditioning* encoder (curation embeds with it, the generator conditions on it, as a real run
  uses antelopev2's ArcFace) on the even-numbered photos of every training identity, and an
  *independent judge* of another architecture and seed on the odd-numbered ones. The judge plays no
  part in training, so the figures it gives are not the generator's own training signal.
- The VAE (diffusers ``AutoencoderKL``, three levels: 64 px <-> 4 x 16 x 16 latents) on the
  training photos aligned as curation aligns them (:mod:`idforge.train.vae`). It is cached under
  ``$IDFORGE_CACHE/demo-vae/<key>`` (default ``~/.cache/idforge``), keyed by everything that
  determines it, so later runs with the same data and settings load it instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def aligned_crops(renders: dict, ids, size: int, scale: float, photos=None) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops (N, size, size, 3) uint8 and identity labels of the rendered samples
    ``renders[(identity, k)]``; ``photos`` picks the photo indices k (default: all)."""
    from idforge.data_pipeline.align import align_face

    crops, labels = [], []
    for (i, k), s in renders.items():
        if i in ids and (photos is None or k in photos):
            crop, _ = align_face(np.asarray(s.image), s.landmarks, size=size, scale=scale)
            crops.append(crop)
            labels.append(i)
    return np.stack(crops), np.asarray(labels)


def train_face_encoders(cfg, renders: dict, train_ids, heldout_ids, progress=None) -> dict:
    """Conditioning encoder on even photos, judge on odd photos; returns {"encoder", "judge",
    "verification": {name: held-out verification scores}}."""
    from idforge.models.face.iresnet import IResNetConfig
    from idforge.train.face_encoder import fit_face_encoder, verification_scores

    ids = set(train_ids)
    k_all = range(cfg.images_per_identity)
    runs = {
        "encoder": (IResNetConfig(layers=(1, 1, 1, 1), widths=tuple(cfg.face_widths)), cfg.seed, k_all[0::2]),
        "judge": (
            IResNetConfig(layers=tuple(cfg.judge_layers), widths=tuple(cfg.judge_widths)),
            cfg.seed + 1000,
            k_all[1::2],
        ),
    }
    h_crops, h_labels = aligned_crops(renders, set(heldout_ids), 112, 1.0)
    out = {"verification": {}}
    for name, (arch, seed, photos) in runs.items():
        crops, labels = aligned_crops(renders, ids, 112, 1.0, set(photos))
        encoder, _ = fit_face_encoder(
            crops,
            labels,
            arch,
            epochs=cfg.face_epochs,
            batch_size=cfg.face_batch_size,
            seed=seed,
            progress=(lambda epoch, loss, n=name: progress(n, epoch, loss)) if progress else None,
        )
        encoder.eval()
        out[name] = encoder
        out["verification"][name] = verification_scores(encoder, h_crops, h_labels)
    return out


def _vae_key(cfg, synth_cfg) -> str:
    blob = json.dumps(
        {
            "vae_channels": list(cfg.vae_channels),
            "vae_norm_groups": cfg.vae_norm_groups,
            "vae_train": asdict(cfg.vae_train),
            "synthid": asdict(synth_cfg),
            "resolution": cfg.resolution,
            "crop_scale": cfg.crop_scale,
            "format": 1,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def demo_vae_cache(cfg, synth_cfg) -> Path:
    root = Path(os.environ.get("IDFORGE_CACHE", "~/.cache/idforge")).expanduser()
    return root / "demo-vae" / _vae_key(cfg, synth_cfg)


def vae_training_images(cfg, renders: dict, train_ids) -> torch.Tensor:
    """The training photos aligned as curation aligns them, (N, 3, resolution, resolution) in [-1, 1]."""
    crops, _ = aligned_crops(renders, set(train_ids), cfg.resolution, cfg.crop_scale)
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def untrained_vae(cfg, channels: tuple[int, ...] | None = None):
    """The demo's ``AutoencoderKL`` with random weights (``cfg.vae_channels`` unless ``channels``)."""
    from idforge.models.zoo import TinyConfig, tiny_vae

    return tiny_vae(
        TinyConfig(
            resolution=cfg.resolution,
            vae_channels=tuple(channels or cfg.vae_channels),
            vae_attention=False,
            vae_norm_groups=cfg.vae_norm_groups,
        ),
        seed=cfg.seed,
    )


def demo_vae(cfg, synth_cfg, renders: dict, train_ids, progress=None) -> tuple[object, dict]:
    """The demo's trained ``AutoencoderKL`` and {"cached": bool, "folder", "recon_l1", "scaling_factor",
    "loss"}; trains and caches it when the cache has none for these settings."""
    from diffusers import AutoencoderKL
    from idforge.train.vae import fit_vae

    folder = demo_vae_cache(cfg, synth_cfg)
    info_file = folder / "training.json"
    if info_file.is_file() and (folder / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(folder)
        return vae.eval().requires_grad_(False), {**json.loads(info_file.read_text()), "cached": True}
    vae = untrained_vae(cfg)
    fig = fit_vae(vae, vae_training_images(cfg, renders, train_ids), cfg.vae_train, progress=progress)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    vae.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({**fig, "folder": str(folder)}, indent=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # another run finished first: keep its copy
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return vae, {**fig, "folder": str(folder), "cached": False}


__all__ = [
    "aligned_crops",
    "demo_vae",
    "demo_vae_cache",
    "train_face_encoders",
    "untrained_vae",
    "vae_training_images",
]
