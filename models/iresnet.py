"""IResNet, the ArcFace backbone, in insightface's ``arcface_torch`` layout (Deng et al. 2019).

Module and parameter names match ``arcface_torch/backbones/iresnet.py`` so its released
``backbone.pth`` state dicts load with ``strict=True``: conv1-bn1-prelu stem, four stages of
``IBasicBlock`` (bn1-conv1-bn2-prelu-conv2-bn3, stride in conv2, 1x1 conv + BN shortcut), bn2,
dropout, fc (C x 7 x 7 -> 512) and a BatchNorm1d ``features`` whose scale is fixed at 1.
Input: (B, 3, 112, 112) RGB in [-1, 1], i.e. (x / 255 - 0.5) / 0.5.
``IResNetConfig.widths`` makes tiny variants with the same code (the released models use
(64, 128, 256, 512)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ARCHS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


@dataclass
class IResNetConfig:
    layers: tuple[int, ...] = (3, 4, 14, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    embedding_size: int = 512
    input_size: int = 112
    dropout: float = 0.0

    def __post_init__(self):
        self.layers, self.widths = tuple(self.layers), tuple(self.widths)
        if len(self.layers) != 4 or len(self.widths) != 4:
            raise ValueError(f"IResNet needs 4 stages, got layers={self.layers}, widths={self.widths}")
        if self.input_size % 16:
            raise ValueError(f"input_size must be divisible by 16, got {self.input_size}")

    @classmethod
    def named(cls, arch: str, **kw) -> IResNetConfig:
        if arch not in ARCHS:
            raise ValueError(f"unknown IResNet {arch!r}; choose one of {sorted(ARCHS)}")
        return cls(layers=ARCHS[arch], **kw)


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
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)  # (B, C * 7 * 7)
        return self.features(self.fc(self.dropout(x)))


def config_from_state_dict(state: dict[str, torch.Tensor]) -> IResNetConfig:
    """Infer stages and widths of an arcface_torch state dict (e.g. a released ``backbone.pth``)."""
    layers, widths = [], []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks:
            raise ValueError(f"state dict has no layer{stage}.* keys: not an arcface_torch IResNet")
        layers.append(max(blocks) + 1)
        widths.append(int(state[f"layer{stage}.0.conv1.weight"].shape[0]))
    fc_in = int(state["fc.weight"].shape[1])
    side = int(round((fc_in / widths[-1]) ** 0.5))
    return IResNetConfig(layers=tuple(layers), widths=tuple(widths), embedding_size=int(state["fc.weight"].shape[0]),
                         input_size=side * 16)
