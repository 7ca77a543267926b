"""LPIPS (Zhang et al. 2018) through torchmetrics' implementation, with the backbone from a local file.

torchmetrics (like the ``lpips`` package) bundles the learned linear layers (``lpips_models/*.pth``)
but fetches the ImageNet backbone (AlexNet / VGG16 / SqueezeNet1.1) from torchvision's hub. Here the
network is built with a random backbone plus the bundled linear layers, then the backbone's
``features`` weights are copied in from a local torchvision checkpoint (``alexnet-owt-7be5be79.pth``,
``vgg16-397923af.pth`` or ``squeezenet1_1-b8a52dc0.pth``). The tests pass a random SqueezeNet saved
the same way, so the loading code is the one real runs use.
"""

from __future__ import annotations

from pathlib import Path

import torch

TORCHVISION_NET = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def _slices(net: torch.nn.Module) -> list[torch.nn.Sequential]:
    if hasattr(net, "slices"):
        return list(net.slices)
    return [getattr(net, f"slice{i}") for i in range(1, 6)]


def load_lpips(backbone: str | Path, net: str = "alex") -> torch.nn.Module:
    """LPIPS network (eval mode) whose backbone weights come from a torchvision checkpoint file."""
    import torchvision
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    if net not in TORCHVISION_NET:
        raise ValueError(f"LPIPS net {net!r}: choose one of {sorted(TORCHVISION_NET)}")
    path = Path(backbone).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no LPIPS backbone file; pass torchvision's {TORCHVISION_NET[net]} ImageNet checkpoint"
        )
    tv = getattr(torchvision.models, TORCHVISION_NET[net])(weights=None)
    tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = _NoTrainLpips(net=net, pnet_rand=True)  # random backbone + torchmetrics' bundled linear layers
    by_index = {name: m for seq in _slices(model.net) for name, m in seq.named_children()}
    for i, layer in enumerate(tv.features):
        if str(i) in by_index:
            by_index[str(i)].load_state_dict(layer.state_dict())
    return model.eval()


@torch.no_grad()
def lpips_distance(
    model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """Per-pair LPIPS (N,) of images (N, 3, H, W) in [-1, 1]."""
    from torchmetrics.functional.image.lpips import _lpips_update

    out = []
    for i in range(0, a.shape[0], batch_size):
        d = _lpips_update(
            a[i : i + batch_size].float(), b[i : i + batch_size].float(), model, normalize=False
        )
        out.append(d.reshape(-1))
    return torch.cat(out)
