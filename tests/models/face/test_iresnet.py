"""IResNet keeps arcface_torch's layout, so its backbone.pth state dicts load and their shape says the arch."""

from __future__ import annotations

import pytest
import torch
from idforge.models.face.iresnet import (
    ARCHS,
    IResNet,
    IResNetConfig,
    clean_state_dict,
    config_from_state_dict,
    iresnet18,
    iresnet50,
    load_arcface_state_dict,
)

TINY = IResNetConfig(layers=(1, 1, 1, 1), widths=(4, 8, 8, 16))


def _meta(arch: str) -> IResNet:
    with torch.device("meta"):
        return IResNet(IResNetConfig.named(arch))


@pytest.mark.parametrize(
    "arch,params,keys", [("r18", 24_025_600, 187), ("r50", 43_590_848, 475), ("r100", 65_156_160, 925)]
)
def test_released_depths_have_arcface_torch_parameter_counts(arch, params, keys):
    model = _meta(arch)  # arcface_torch reports 43.6M (r50) and 65.2M (r100) parameters
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_state_dict_keys_follow_arcface_torch_names():
    state = _meta("r50").state_dict()
    for key in [
        "conv1.weight",
        "bn1.running_var",
        "prelu.weight",
        "layer1.0.bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.0.bn2.bias",
        "layer1.0.prelu.weight",
        "layer1.0.conv2.weight",
        "layer1.0.bn3.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.num_batches_tracked",
        "layer3.13.conv2.weight",
        "bn2.weight",
        "fc.weight",
        "fc.bias",
        "features.weight",
        "features.running_mean",
    ]:
        assert key in state, key
    assert "layer1.1.downsample.0.weight" not in state and "layer3.14.conv1.weight" not in state
    assert state["fc.weight"].shape == (512, 512 * 7 * 7)
    assert state["prelu.weight"].shape == (64,)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_is_inferred_from_state_dict_shapes(arch):
    assert config_from_state_dict(_meta(arch).state_dict()) == IResNetConfig.named(arch)


def test_tiny_variant_maps_112_crops_to_512_d_and_downsamples_to_7x7():
    model = IResNet(TINY).eval()
    assert model.fc.in_features == 16 * 7 * 7
    out = model(torch.rand(3, 3, 112, 112) * 2 - 1)
    assert out.shape == (3, 512) and torch.isfinite(out).all()


def test_features_scale_is_fixed_at_one_and_not_trained():
    model = IResNet(TINY)
    assert not model.features.weight.requires_grad and torch.all(model.features.weight == 1)
    assert model.features.bias.requires_grad


def test_named_constructors_and_aliases_agree():
    assert (
        IResNetConfig.named("iresnet50") == IResNetConfig.named("r50") == IResNetConfig(layers=(3, 4, 14, 3))
    )
    assert IResNetConfig().layers == ARCHS["r18"]
    with torch.device("meta"):
        assert iresnet18().config.layers == (2, 2, 2, 2)
        assert iresnet50(embedding_size=256).fc.out_features == 256
    with pytest.raises(ValueError, match="unknown IResNet"):
        IResNetConfig.named("r200")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"layers": (1, 1, 1)}, "4 stages"),
        ({"widths": (4, 8, 0, 8)}, "positive"),
        ({"input_size": 100}, "multiple of 16"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_invalid_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        IResNetConfig(**kw)


def test_fp16_flag_is_a_no_op_on_cpu():
    torch.manual_seed(0)
    a = IResNet(TINY).eval()
    b = IResNet(IResNetConfig(layers=TINY.layers, widths=TINY.widths, fp16=True)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert torch.equal(a(x), b(x))


def test_training_checkpoints_are_unwrapped_and_prefixes_stripped():
    state = IResNet(TINY).state_dict()
    wrapped = {"state_dict_backbone": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    clean = clean_state_dict(wrapped)
    assert set(clean) == set(state)
    with pytest.raises(ValueError, match="no tensors"):
        clean_state_dict({"epoch": 3})


def test_missing_batch_counters_are_tolerated_but_other_keys_are_not():
    torch.manual_seed(0)
    src = IResNet(TINY)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = IResNet(TINY)
    load_arcface_state_dict(dst, state)
    assert torch.equal(dst.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    del state["fc.bias"]
    with pytest.raises(ValueError, match="fc.bias"):
        load_arcface_state_dict(dst, state, "ckpt.pth")


def test_non_iresnet_state_dict_is_refused_with_its_keys():
    with pytest.raises(ValueError, match="not an arcface_torch IResNet"):
        config_from_state_dict({"encoder.weight": torch.zeros(2, 2)}, "other.pth")
