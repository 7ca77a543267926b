"""ReferenceNet training (FlashFace sec. 3.2, SPEC.md sec. 3): group batches with a variable number of
references train the ReferenceNet and the reference attention, dropped samples lose their reference
tokens, and the tiny config trains through `idforge train fit` on SynthID group shards."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from idforge.data_pipeline.reader import collate_identity_samples
from idforge.models.generator import GeneratorConfig
from idforge.models.zoo import ZooSpec
from idforge.train.module import IdentityDiffusionModule
from idforge.train.optim import ParamGroup
from torch.utils.data import DataLoader

from tests.data_pipeline.conftest import synthid_folder, tiny_face_encoder  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
_LMS = torch.tensor([[11.0, 14.0], [21.0, 14.0], [16.0, 19.0], [12.0, 25.0], [20.0, 25.0]])


def _group_batch(num_refs: list[int], seed: int = 0) -> dict:
    """A collated group batch: sample i has ``num_refs[i]`` references (padded by the reader's collate)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for n in num_refs:
        items.append(
            {
                "image": torch.rand(3, 32, 32, generator=g) * 2 - 1,
                "landmarks": _LMS.clone(),
                "box": torch.tensor([6.0, 8.0, 26.0, 30.0]),
                "embedding": torch.nn.functional.normalize(torch.randn(512, generator=g), dim=-1),
                "caption": "a photo of a person",
                "refs": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
                "ref_landmarks": _LMS.expand(n, 5, 2).clone(),
                "num_refs": n,
            }
        )
    return collate_identity_samples(items)


def _module(tiny_zoo, conditioning="referencenet", **kw):
    spec = ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )
    adapter = {} if conditioning == "referencenet" else {"variant": "final"}
    cfg = GeneratorConfig(
        zoo=spec,
        adapter=adapter,
        conditioning=conditioning,
        reference={"placement": "decoder", "face_mask": "mask", "image_size": 16},
    )
    kw.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=1e-3))
    return IdentityDiffusionModule(cfg, **kw)


def _trainer(tmp_path, steps):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


@pytest.mark.parametrize("conditioning", ["referencenet", "both"])
def test_group_batches_with_variable_n_train_the_referencenet_and_reference_attention(
    tiny_zoo, tmp_path, conditioning
):
    groups = [
        ParamGroup(name="reference_net", match=["reference_net.*"], lr=2e-3),
        ParamGroup(name="rest", match=["*"], lr=1e-3),
    ]
    module = _module(tiny_zoo, conditioning, param_groups=groups)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    batches = [_group_batch([1, 4, 2]), _group_batch([3, 1, 1], seed=1)]
    _trainer(tmp_path, 2).fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    after = module.model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert any(k.startswith("reference_net.unet.") for k in changed)
    assert any(".processor.to_k_ref" in k for k in changed)  # the main UNet's reference attention
    assert any(k.startswith("unet.conv_in") for k in changed)  # the widened conv_in (face-mask channel)
    assert not any(k.startswith(("codec.", "text_encoder.", "face_encoder.")) for k in changed)
    assert any(k.startswith("adapter.") for k in changed) == (conditioning == "both")
    rates = {g["name"]: g["lr"] for g in module.optimizers().optimizer.param_groups}
    assert rates == {"reference_net": 2e-3, "rest": 1e-3}
    assert set(module.model.trainable_state_dict()) >= {k for k in after if k.startswith("reference_net.")}


def test_dropped_samples_lose_their_reference_tokens_and_face_mask(tiny_zoo):
    module = _module(tiny_zoo)
    model = module.model
    batch = _group_batch([2, 3])
    g = torch.Generator().manual_seed(0)
    latents = model.codec.encode(batch["image"], generator=g)
    noisy = torch.randn(latents.shape, generator=g)
    t = torch.tensor([500, 500])
    cond = model.condition(None, None, model.encode_text(batch["caption"]))
    kept = torch.tensor([False, True])
    with torch.no_grad():
        x, features = module._reference_inputs(batch, noisy, latents, kept, None)
        assert features.mask[0].sum() == 0 and features.mask[1].sum() == 3
        with_refs = model.predict(x, t, cond, features)
        no_refs = model.predict(model.unet_input(noisy), t, cond, None)
        _, all_kept = module._reference_inputs(batch, noisy, latents, None, None)
        sample0_kept = model.predict(model.unet_input(noisy, batch["box"], (32, 32)), t, cond, all_kept)
    # the dropped sample computes exactly what the UNet computes without references or mask
    torch.testing.assert_close(with_refs[0], no_refs[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(with_refs[1], no_refs[1], atol=1e-4)
    assert not torch.allclose(sample0_kept[0], no_refs[0], atol=1e-4)
    assert x[0, 4:].abs().sum() == 0 and x[1, 4:].sum() > 0  # mask channel zeroed only where dropped


def test_referencenet_generator_refuses_single_batches(tiny_zoo):
    module = _module(tiny_zoo)
    single = {k: v for k, v in _group_batch([1, 1]).items() if k not in ("refs", "ref_mask", "num_refs")}
    with pytest.raises(ValueError, match="use data.mode: group"):
        module._losses(single)


@pytest.fixture(scope="module")
def synthid_group_shards(synthid_folder, tiny_face_encoder, tmp_path_factory):  # noqa: F811
    from idforge.data_pipeline.curate import run_curation
    from idforge.data_pipeline.filters import FilterConfig
    from idforge.data_pipeline.job import CurateConfig

    out = tmp_path_factory.mktemp("shards")
    run_curation(
        CurateConfig(
            input=str(synthid_folder),
            output=str(out),
            resolution=32,
            embedder=tiny_face_encoder,
            filters=FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None),
        )
    )
    return out


def test_tiny_flashface_config_trains_through_the_cli_on_synthid_groups(synthid_group_shards, tmp_path):
    from idforge.launch.cli import main

    root = tmp_path / "run"
    code = main(
        [
            "train",
            "fit",
            "--config",
            str(ROOT / "configs" / "train" / "tiny_flashface.yaml"),
            f"--data.train_shards={synthid_group_shards}/train-*.tar",
            "--data.batch_size=2",
            "--trainer.max_steps=3",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_checkpointing=true",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert code in (0, None)
    ckpt = next(root.rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    assert any(k.startswith("model.reference_net.unet.") for k in state["state_dict"])
