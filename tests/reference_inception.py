"""A torch stand-in for `torchvision.models.inception`, so the pytorch-fid reference package imports offline.

PyPI's torchvision cannot import beside the CPU torch wheel (tests/conftest.py hides it). pytorch_fid's
inception.py needs, from torchvision: `__version__`, `models.inception.InceptionA/C/E` (it subclasses them
into FIDInceptionA/C/E_1/E_2) and `models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
init_weights=False)`; its `load_state_dict_from_url` import falls back to torch's own when
`torchvision.models.utils` is absent (it is, here). pytorch_fid's fid_score.py needs `transforms.ToTensor`.
The classes below follow torchvision's definitions with the same attribute names, so state-dict keys are the
real ones (`Mixed_5b.branch5x5_1.conv.weight`, ...). `import_pytorch_fid()` imports both pytorch_fid modules
with the stand-in lent as `sys.modules["torchvision"]` for the import only, then restores what was there.

`fid_reference(seed)` builds pytorch-fid's FID network with random weights: the one download in
`fid_inception_v3()` (`load_state_dict_from_url`) is replaced by a function handing back a state dict the
test chose, and nothing is fetched.
"""
from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STANDIN_VERSION = "0.28.0"  # reported as torchvision.__version__: pytorch-fid then passes weights= and init_weights=


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _cat(*tensors):
    return torch.cat(tensors, 1)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):  # torchvision's (count_include_pad=True); pytorch-fid overrides it
        return _cat(self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)))


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return _cat(self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    F.max_pool2d(x, kernel_size=3, stride=2))


class InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):  # overridden by pytorch-fid
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for i in range(1, 6):
            b7dbl = getattr(self, f"branch7x7dbl_{i}")(b7dbl)
        return _cat(self.branch1x1(x), b7, b7dbl,
                    self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)))


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return _cat(self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2))


class InceptionE(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):  # overridden by pytorch-fid
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return _cat(self.branch1x1(x), _cat(self.branch3x3_2a(b3), self.branch3x3_2b(b3)),
                    _cat(self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)),
                    self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)))


class Inception3(nn.Module):
    """torchvision's Inception3 without the auxiliary head (pytorch-fid builds it with aux_logits=False)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.AuxLogits = None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(2048, num_classes)


def inception_v3(*, weights=None, num_classes=1000, aux_logits=True, init_weights=None, **kwargs) -> Inception3:
    """Random-weight Inception3 (PyTorch's default init). Pretrained weights are refused: tests never download."""
    if weights is not None:
        raise RuntimeError(f"tests/reference_inception.py: pretrained Inception weights ({weights!r}) are never "
                           "downloaded in tests")
    if aux_logits:
        raise TypeError("inception_v3 stand-in: only aux_logits=False (pytorch-fid's FID network) is provided")
    if kwargs:
        raise TypeError(f"inception_v3 stand-in: unsupported arguments {sorted(kwargs)}")
    return Inception3(num_classes=num_classes)


class ToTensor:
    """torchvision.transforms.ToTensor for 8-bit PIL images: (H, W, C) uint8 -> (C, H, W) float32 / 255."""

    def __call__(self, picture) -> torch.Tensor:
        array = np.array(picture, dtype=np.uint8, copy=True)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


@contextlib.contextmanager
def lent_torchvision():
    """Makes `import torchvision` (models.inception, transforms) resolve to this stand-in inside the block."""
    fake = types.ModuleType("torchvision")
    fake.__version__ = STANDIN_VERSION
    inception = types.SimpleNamespace(BasicConv2d=BasicConv2d, InceptionA=InceptionA, InceptionB=InceptionB,
                                      InceptionC=InceptionC, InceptionD=InceptionD, InceptionE=InceptionE,
                                      Inception3=Inception3, inception_v3=inception_v3)
    fake.models = types.SimpleNamespace(inception=inception, inception_v3=inception_v3)
    fake.transforms = types.ModuleType("torchvision.transforms")
    fake.transforms.ToTensor = ToTensor
    names = ("torchvision", "torchvision.transforms")
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    sys.modules.update({"torchvision": fake, "torchvision.transforms": fake.transforms})
    try:
        yield fake
    finally:
        for name in names:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                del sys.modules[name]


def import_pytorch_fid():
    """Imports `pytorch_fid.inception` and `pytorch_fid.fid_score` (their imports need torchvision) and returns
    (inception, fid_score).

    pytorch_fid binds the stand-in module objects at import and uses them later (`torchvision.models.inception_v3`,
    `TF.ToTensor`), so they stay reachable through pytorch_fid after the block."""
    if "pytorch_fid.fid_score" not in sys.modules:
        with lent_torchvision():
            import pytorch_fid.fid_score  # noqa: F401 (imports pytorch_fid.inception)
    return sys.modules["pytorch_fid.inception"], sys.modules["pytorch_fid.fid_score"]


@contextlib.contextmanager
def no_download(state_dict: Mapping[str, torch.Tensor] | None):
    """Inside the block pytorch-fid's `load_state_dict_from_url` returns `state_dict` (or, when None, the
    freshly built network's own random weights, so loading is a no-op) instead of downloading anything."""
    module = import_pytorch_fid()[0]
    built = []
    original_build, original_load = module._inception_v3, module.load_state_dict_from_url

    def build(*args, **kwargs):
        built.append(original_build(*args, **kwargs))
        return built[-1]

    def load(url, *args, **kwargs):
        if state_dict is not None:
            return dict(state_dict)
        return {k: v.clone() for k, v in built[-1].state_dict().items()}

    module._inception_v3, module.load_state_dict_from_url = build, load
    try:
        yield module
    finally:
        module._inception_v3, module.load_state_dict_from_url = original_build, original_load


def fid_reference(seed: int, calibration: torch.Tensor) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(pytorch-fid `InceptionV3([3])` in eval mode, the `fid_inception_v3()` state dict it was loaded from).

    Weights are random (PyTorch's default init, seeded) with non-trivial BatchNorm parameters: running means
    and variances are first set to the statistics of `calibration` ((N, 3, 299, 299) in [-1, 1]) so that
    activations stay O(1) through the 94 convs, then perturbed (mean += 0.2 std * N(0, 1), var *= U(0.5, 2));
    BN weight ~ U(0.5, 1.5), bias ~ U(-0.2, 0.2). The state dict is what pytorch-fid's weights file holds
    (with `num_batches_tracked` buffers and the 1008-way `fc`).
    """
    module = import_pytorch_fid()[0]
    torch.manual_seed(seed)
    with no_download(None):
        inception = module.fid_inception_v3()
    bns = [m for m in inception.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one training-mode pass sets the batch statistics
        inception.train()
        x = calibration
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(inception, name)(x)
        inception.eval()
        for bn in bns:
            bn.momentum = 0.1
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.2 * std * torch.randn_like(std))
            bn.running_var.mul_(torch.empty_like(std).uniform_(0.5, 2.0))
    state_dict = inception.state_dict()  # an OrderedDict with torch's `_metadata`, as a saved file holds
    with no_download(state_dict):
        model = module.InceptionV3([module.InceptionV3.DEFAULT_BLOCK_INDEX])
    return model.eval(), state_dict
