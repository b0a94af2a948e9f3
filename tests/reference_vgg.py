"""A torch stand-in for `torchvision.models.vgg16`, so the lpips reference package imports offline.

PyPI's torchvision cannot import beside the CPU torch wheel (tests/conftest.py hides it). lpips needs only
`torchvision.models.vgg16(pretrained=...).features`, the VGG16 conv stack (configuration "D"), whose module
indices (`features.N`) match torchvision's. `lpips_module()` imports lpips with the stand-in lent as
`sys.modules["torchvision"]` for the import only, then restores what was there.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch

# VGG16 ("D"): numbers are 3x3 conv widths (each followed by ReLU), "M" a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(torch.nn.Module):
    """The VGG16 feature stack only (`features`, 31 modules); no classifier head."""

    def __init__(self):
        super().__init__()
        layers: list[torch.nn.Module] = []
        channels = 3
        for item in VGG16_CFG:
            if item == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [torch.nn.Conv2d(channels, item, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
                channels = item
        self.features = torch.nn.Sequential(*layers)
        for module in self.features:
            if isinstance(module, torch.nn.Conv2d):  # torchvision's VGG init
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)


def vgg16(pretrained: bool = False, **kwargs) -> VGG16:
    """Random-weight VGG16 (torchvision's init). `pretrained=True` is refused: tests never download."""
    if pretrained:
        raise RuntimeError("tests/reference_vgg.py: pretrained VGG16 weights are never downloaded in tests")
    if kwargs:
        raise TypeError(f"vgg16 stand-in: unsupported arguments {sorted(kwargs)}")
    return VGG16()


@contextlib.contextmanager
def lent_torchvision():
    """Makes `from torchvision import models; models.vgg16(...)` resolve to this stand-in inside the block."""
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(vgg16=vgg16)
    saved = sys.modules.get("torchvision", None)
    sys.modules["torchvision"] = fake
    try:
        yield fake
    finally:
        sys.modules["torchvision"] = saved


def import_lpips():
    """Imports the lpips package (its module import needs torchvision) and returns it."""
    if "lpips" in sys.modules:
        return sys.modules["lpips"]
    with lent_torchvision():
        import lpips
    return lpips


def lpips_module(seed: int = 0) -> torch.nn.Module:
    """`lpips.LPIPS(net="vgg")` with the real v0.1 heads and a random VGG16 trunk (random biases too).

    lpips binds `torchvision.models` as `lpips.pretrained_networks.tv` at import; it is pointed at the
    stand-in again here in case lpips was imported some other way.
    """
    lpips = import_lpips()
    lpips.pretrained_networks.tv = types.SimpleNamespace(vgg16=vgg16)
    torch.manual_seed(seed)
    model = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)
    with torch.no_grad():
        for module in model.net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()
