"""IResNet, the ArcFace backbone, in insightface's ``arcface_torch`` layout (Deng et al. 2019).

Module and parameter names match ``arcface_torch/backbones/iresnet.py`` so its released
``backbone.pth`` state dicts load with ``strict=True``: conv1-bn1-prelu stem, four stages of
``IBasicBlock`` (bn1-conv1-bn2-prelu-conv2-bn3, stride 2 in the first block's conv2, 1x1 conv + BN
shortcut), bn2, dropout, fc (C x 7 x 7 -> 512) and a BatchNorm1d ``features`` whose scale is fixed
at 1 (``requires_grad=False``, as arcface_torch). With ``fp16`` the convolutional body runs under
CUDA autocast and fc/features in float32, as arcface_torch.

Input: (B, 3, 112, 112) RGB in [-1, 1], i.e. (x / 255 - 0.5) / 0.5. ``IResNetConfig.widths`` makes
tiny variants with the same code (the released models use (64, 128, 256, 512)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

ARCHS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
_ALIASES = {f"{p}{n}": f"r{n}" for n in (18, 34, 50, 100) for p in ("", "r", "iresnet", "ir")}


@dataclass
class IResNetConfig:
    layers: tuple[int, ...] = (2, 2, 2, 2)
    """Blocks per stage (r18 (2,2,2,2), r34 (3,4,6,3), r50 (3,4,14,3), r100 (3,13,30,3))."""
    widths: tuple[int, ...] = (64, 128, 256, 512)
    """Channels per stage; the stem has widths[0]."""
    embedding_size: int = 512
    input_size: int = 112
    """Square input side; the last stage is input_size / 16 wide (7 for 112)."""
    fp16: bool = False
    """Run the convolutional body under CUDA float16 autocast (arcface_torch's ``fp16``)."""
    dropout: float = 0.0

    def __post_init__(self):
        self.layers, self.widths = tuple(int(v) for v in self.layers), tuple(int(v) for v in self.widths)
        if len(self.layers) != 4 or len(self.widths) != 4:
            raise ValueError(
                f"IResNetConfig: 4 stages needed, got layers={self.layers}, widths={self.widths}"
            )
        if min(self.layers) < 1 or min(self.widths) < 1 or self.embedding_size < 1:
            raise ValueError(
                f"IResNetConfig: layers, widths and embedding_size must be positive, got "
                f"layers={self.layers}, widths={self.widths}, embedding_size={self.embedding_size}"
            )
        if self.input_size <= 0 or self.input_size % 16:
            raise ValueError(
                f"IResNetConfig: input_size must be a positive multiple of 16, got {self.input_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"IResNetConfig: dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def named(cls, arch: str, **kw) -> IResNetConfig:
        """Config of a released depth: ``"r18"``, ``"r34"``, ``"r50"``, ``"r100"`` (or ``iresnet50``...)."""
        key = _ALIASES.get(str(arch).lower())
        if key is None:
            raise ValueError(f"unknown IResNet {arch!r}; choose one of {sorted(ARCHS)}")
        return cls(layers=ARCHS[key], **kw)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    def __init__(self, config: IResNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or IResNetConfig()
        self.inplanes = cfg.widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(cfg.widths[0], cfg.layers[0])
        self.layer2 = self._make_layer(cfg.widths[1], cfg.layers[1])
        self.layer3 = self._make_layer(cfg.widths[2], cfg.layers[2])
        self.layer4 = self._make_layer(cfg.widths[3], cfg.layers[3])
        self.bn2 = nn.BatchNorm2d(cfg.widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=cfg.dropout)
        side = cfg.input_size // 16
        self.fc = nn.Linear(cfg.widths[3] * side * side, cfg.embedding_size)
        self.features = nn.BatchNorm1d(cfg.embedding_size, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():  # arcface_torch's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-05)
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, embedding_size) un-normalised embeddings."""
        autocast = self.config.fp16 and x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=autocast):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))  # (B, C * S/16 * S/16)
        x = self.fc(x.float() if autocast else x)
        return self.features(x)


def iresnet18(**kw) -> IResNet:
    return IResNet(IResNetConfig.named("r18", **kw))


def iresnet34(**kw) -> IResNet:
    return IResNet(IResNetConfig.named("r34", **kw))


def iresnet50(**kw) -> IResNet:
    return IResNet(IResNetConfig.named("r50", **kw))


def iresnet100(**kw) -> IResNet:
    return IResNet(IResNetConfig.named("r100", **kw))


_WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone")
_PREFIXES = ("module.", "backbone.", "model.")


def clean_state_dict(state: Mapping, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The bare arcface_torch state dict from a ``backbone.pth`` or a training checkpoint.

    Unwraps ``{"state_dict_backbone": ...}``-style checkpoints and strips DDP/Lightning prefixes
    (``module.``, ``backbone.``, ``model.``).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{source}: expected a state dict (mapping of tensors), got {type(state).__name__}")
    for key in _WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for p in _PREFIXES:  # a prefix shared by every key (DDP's module., a wrapper's backbone.)
        if out and all(k.startswith(p) for k in out):
            out = {k[len(p) :]: v for k, v in out.items()}
    if not out:
        raise ValueError(f"{source}: contains no tensors; not an arcface_torch backbone checkpoint")
    return out


def config_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> IResNetConfig:
    """Infer stages, widths, embedding size and input size of an arcface_torch state dict."""
    layers, widths = [], []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks or f"layer{stage}.0.conv1.weight" not in state:
            raise ValueError(
                f"{source}: no layer{stage}.* keys (found e.g. {sorted(state)[:3]}); not an "
                "arcface_torch IResNet state dict. Pass arch='r50' etc. only for IResNet weights."
            )
        layers.append(max(blocks) + 1)
        widths.append(int(state[f"layer{stage}.0.conv1.weight"].shape[0]))
    if "fc.weight" not in state:
        raise ValueError(f"{source}: no fc.weight; not an arcface_torch IResNet state dict")
    fc_out, fc_in = (int(v) for v in state["fc.weight"].shape)
    side = round((fc_in / widths[-1]) ** 0.5)
    if side * side * widths[-1] != fc_in:
        raise ValueError(
            f"{source}: fc takes {fc_in} features, not widths[-1] x side^2 for width {widths[-1]}"
        )
    return IResNetConfig(
        layers=tuple(layers), widths=tuple(widths), embedding_size=fc_out, input_size=side * 16
    )


def load_arcface_state_dict(
    model: IResNet, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """``load_state_dict(strict=True)``, except that missing BatchNorm ``num_batches_tracked`` counters
    (absent from some older exports, and unused in eval) are tolerated."""
    expected = model.state_dict()
    state = dict(state)
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{source}: weights do not fit IResNet(layers={model.config.layers}, "
            f"widths={model.config.widths}): {e}"
        ) from e
