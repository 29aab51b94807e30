"""Image classification models for both ends of the scale.

* ``tiny``     -- a small ResNet (~80k parameters at width 16) that trains CIFAR-10 / Fashion-MNIST to a
  useful accuracy in minutes on 2 CPU cores;
* ``resnet18`` -- torchvision ResNet-18, CIFAR variant (3x3 stem, stride 1, no max-pool);
* ``resnet50`` -- torchvision ResNet-50 for ImageNet-style data.

Initialisation is deterministic without touching the caller's global RNG: ``build_model``
runs the constructors inside ``torch.random.fork_rng`` seeded from ``seed``, so the
global CPU generator is restored afterwards (see docs/training.md).
"""
from __future__ import annotations

import torch
from torch import nn

MODELS = ("tiny", "resnet18", "resnet50")


class BasicBlock(nn.Module):
    """Pre-activation-free ResNet basic block (conv-bn-relu-conv-bn + shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.short(x))


class TinyResNet(nn.Module):
    """Small ResNet: 3x3 stem + three stages (one basic block each, stride 2) + global pool + linear.

    ``width`` sets the channels of the first stage (doubled per stage). Every stage halves
    the resolution (32 -> 16 -> 8 -> 4), which keeps CPU training affordable (its speed
    against a stride-1 first stage is in docs/results.md).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 strides: tuple[int, int, int] = (2, 2, 2)) -> None:
        super().__init__()
        w, s = width, strides
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(BasicBlock(w, w, s[0]), BasicBlock(w, 2 * w, s[1]), BasicBlock(2 * w, 4 * w, s[2]))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _resnet18_cifar(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import resnet18

    m = resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _resnet50(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import resnet50

    m = resnet50(num_classes=num_classes)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return m


def build_model(name: str, num_classes: int, in_channels: int = 3, seed: int = 0, width: int = 16) -> nn.Module:
    """Build model ``name`` with weights initialised from ``seed`` (global RNG state untouched)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny":
            return TinyResNet(num_classes, in_channels, width)
        if name == "resnet18":
            return _resnet18_cifar(num_classes, in_channels)
        return _resnet50(num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
