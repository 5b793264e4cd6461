"""ResNet with BasicBlocks (He et al., 2016) in torchvision's module layout.

Parameter and buffer names are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`,
`layer2.0.downsample.0`, `fc`, ...), so torchvision's `resnet18` state dict loads into
`ResNet((2, 2, 2, 2))`. `width` scales every stage (64 is torchvision's) so tests can build a
small one. `recalibrate_batchnorm_` gives randomly initialised weights BatchNorm statistics of
real inputs, so that a network nobody trained still has activations on the scale a trained one
has (its outputs are then a meaningful thing for a quantized copy to agree with).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ptqkit.core.errors import ConfigError

__all__ = ["BasicBlock", "ResNet", "recalibrate_batchnorm_", "resnet18"]


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the input (through a strided 1x1 conv + BN
    when the shape changes), then ReLU. `relu` is one module used twice, as in torchvision."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """[N, 3, H, W] normalized images -> [N, num_classes] logits; `layers` blocks per stage."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), *, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ConfigError(f"ResNet layers={tuple(layers)!r} is invalid; it must be 4 positive block counts")
        for name, value in (("num_classes", num_classes), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ResNet {name}={value!r} is invalid; it must be a positive integer")
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for stage, blocks in enumerate(layers):
            cout = width * 2**stage
            stride = 1 if stage == 0 else 2
            stage_blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [N, width, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N, 8·width, H/32, W/32]
        return self.fc(torch.flatten(self.avgpool(x), 1))  # [N, num_classes]


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (torchvision's layout and initialisation, random weights)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes)


def recalibrate_batchnorm_(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> nn.Module:
    """Set every BatchNorm's running mean and variance to their averages over `images` [N, ...]
    (cumulative averages, one pass, no weight changes); returns `model` in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()
