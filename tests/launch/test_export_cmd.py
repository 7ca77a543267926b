"""``idforge export`` of a real training checkpoint ships the trained (EMA) weights, and the exported
folder generates images that depend on them."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from idforge.inference.export import load_exported
from idforge.inference.pipeline import IdentityEmbeds
from idforge.launch.cli import main
from idforge.models.generator import GeneratorConfig, IdentityGenerator
from idforge.models.zoo import ZooSpec
from idforge.train.ema import EMA
from idforge.train.module import IdentityDiffusionModule
from torch.utils.data import DataLoader

from tests.builders import live_pipeline

_LMS = torch.tensor([[11.0, 14.0], [21.0, 14.0], [16.0, 19.0], [12.0, 25.0], [20.0, 25.0]])


def _batches(n: int = 3, b: int = 2):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
            "landmarks": _LMS.expand(b, 5, 2).clone(),
            "embedding": torch.nn.functional.normalize(torch.randn(b, 512, generator=g), dim=-1),
            "caption": ["a photo of a person"] * b,
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def trained(tiny_zoo, tmp_path_factory):
    """(checkpoint path, weights before training): 3 Adam steps at a large rate, EMA decay 0.5."""
    spec = ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )
    torch.manual_seed(0)
    module = IdentityDiffusionModule(
        GeneratorConfig(zoo=spec, adapter={"variant": "final"}),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    initial = {k: v.clone() for k, v in module.model.trainable_state_dict().items()}
    root = tmp_path_factory.mktemp("run")
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[EMA(decay=0.5)],
    )
    trainer.fit(module, train_dataloaders=DataLoader(_batches(), batch_size=None))
    path = root / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, initial


def _images(model):
    arc = torch.nn.functional.normalize(
        torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    clip = torch.randn(2, model.image_encoder.output_dim, generator=torch.Generator().manual_seed(2))
    pipe = live_pipeline(model)
    return pipe(
        ["a photo", "a face"],
        identity=IdentityEmbeds(arc, clip),
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_export_ships_the_checkpoints_ema_weights_not_the_initial_ones(trained, tmp_path):
    ckpt_path, initial = trained
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ema = ckpt["ema"]
    live = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    moved = [k for k in ema if not torch.equal(ema[k], initial[k])]
    assert any(k.startswith("adapter.") for k in moved) and any(k.startswith("unet.") for k in moved)
    assert any(not torch.equal(ema[k], live[k]) for k in ema)  # EMA (decay 0.5) lags the live weights

    assert (
        main(["export", "--checkpoint", str(ckpt_path), "--out", str(tmp_path / "m"), "--crop_scale", "1"])
        == 0
    )
    loaded, manifest = load_exported(tmp_path / "m")
    assert manifest["ema"] is True
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ema.items()), "exported weights are not the EMA weights"

    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(ckpt_path),
                "--out",
                str(tmp_path / "live"),
                "--crop_scale",
                "1",
                "--ema",
                "false",
            ]
        )
        == 0
    )
    state = load_exported(tmp_path / "live")[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in live.items())


def test_exported_images_are_those_of_the_trained_weights(trained, tmp_path):
    ckpt_path, _ = trained
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert (
        main(["export", "--checkpoint", str(ckpt_path), "--out", str(tmp_path / "m"), "--crop_scale", "1"])
        == 0
    )
    exported = _images(load_exported(tmp_path / "m")[0])

    torch.manual_seed(0)
    untrained = IdentityGenerator.from_config(GeneratorConfig(**ckpt["hyper_parameters"]["generator"])).eval()
    before = _images(untrained)
    untrained.load_state_dict(ckpt["ema"], strict=False)  # the same network with the trained weights
    after = _images(untrained)
    assert (exported - after).abs().max() < 1e-5
    assert (exported - before).abs().max() > 1e-2  # generation depends on what training changed
