"""The LightningModule: one training step on CPU, losses logged, only trainable weights checkpointed."""

from __future__ import annotations

import lightning as L
import torch
from idforge.models.generator import GeneratorConfig
from idforge.models.losses import IdentityLossConfig
from idforge.models.zoo import ZooSpec
from idforge.train.module import IdentityDiffusionModule
from torch.utils.data import DataLoader

_LMS = torch.tensor([[11.0, 14.0], [21.0, 14.0], [16.0, 19.0], [12.0, 25.0], [20.0, 25.0]])


def _batches(n: int = 2, b: int = 2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        out.append(
            {
                "image": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
                "landmarks": _LMS.expand(b, 5, 2).clone(),
                "box": torch.tensor([[6.0, 8.0, 26.0, 30.0]]).expand(b, 4).clone(),
                "embedding": torch.nn.functional.normalize(torch.randn(b, 512, generator=g), dim=-1),
                "caption": ["a photo of a person with a round face"] * b,
            }
        )
    return out


def _module(tiny_zoo, identity_loss=None, **adapter):
    spec = ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )
    return IdentityDiffusionModule(
        GeneratorConfig(zoo=spec, adapter={"variant": "final", **adapter}),
        identity_loss=identity_loss,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )


def test_one_training_step_updates_trainable_weights_only(tiny_zoo, tmp_path):
    module = _module(tiny_zoo, IdentityLossConfig(lambda_id=0.1, k=5.0))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader(_batches(), batch_size=None))
    after = module.model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    trainable = set(module.model.trainable_state_dict())
    assert changed and changed <= trainable
    assert any(k.startswith("adapter.") for k in changed) and any(k.startswith("unet.") for k in changed)
    for key in ("train/loss", "train/denoise", "train/identity", "train/w_t", "train/id_cos"):
        assert key in trainer.callback_metrics, key


def test_checkpoint_holds_exactly_the_trainable_weights(tiny_zoo, tmp_path):
    module = _module(tiny_zoo)
    module.model.train_unet = False
    for name, p in module.model.named_parameters():
        p.requires_grad_(module.model.is_trainable(name))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader(_batches(1), batch_size=None))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys == {f"model.{k}" for k in module.model.state_dict() if k.startswith("adapter.")}


def test_validation_loss_is_reproducible(tiny_zoo):
    module = _module(tiny_zoo)
    module.eval()
    batch = _batches(1)[0]
    with torch.no_grad():
        g1 = torch.Generator().manual_seed(5)
        g2 = torch.Generator().manual_seed(5)
        a = module._losses(batch, generator=g1, drop=False)["loss"]
        b = module._losses(batch, generator=g2, drop=False)["loss"]
    assert torch.equal(a, b)


def test_identity_loss_skips_samples_whose_identity_input_was_dropped(tiny_zoo):
    module = _module(tiny_zoo, IdentityLossConfig(lambda_id=0.1, k=0.0))
    batch = _batches(1, b=4)[0]
    module.id_drop_prob = 1.0  # every identity input dropped: no sample may carry an identity term
    out = module._losses(batch, drop=True)
    assert "identity" not in out and torch.equal(out["loss"], out["denoise"])
    module.id_drop_prob = 0.0
    out = module._losses(batch, drop=True)
    assert "identity" in out and out["loss"] > out["denoise"]
    del batch["embedding"]  # without stored embeddings the reference is ArcFace of the target itself
    out = module._losses(batch, drop=True)
    assert "identity" in out and out["loss"] > out["denoise"]
