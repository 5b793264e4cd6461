"""MobileNetV2 (Sandler et al., 2018) in torchvision's module layout, plus ImageNet preprocessing.

torchvision itself is not importable next to every torch build, so the architecture is written
here so that torchvision's ImageNet state dict (`mobilenet_v2-b0353104.pth`) loads with
``strict=True``: ``features.0`` is the stem (``.0`` conv, ``.1`` BN, ``.2`` ReLU6),
``features.1..17`` are ``InvertedResidual`` blocks whose ``conv`` Sequential holds
[expand ConvBNReLU6 (when t != 1), depthwise ConvBNReLU6, 1x1 project conv, BN],
``features.18`` the 1x1 head to 1280 channels, and ``classifier.1`` the Linear layer.
The class names (``InvertedResidual``, ``Conv2dNormActivation``) match torchvision's so that the
CNN tables in ``ptqkit.models.mappings`` find the blocks.

Preprocessing follows torchvision's ``IMAGENET1K_V1`` transforms: resize the shorter side to
256 (bilinear, antialiased), center-crop 224, scale to [0, 1], normalize with the ImageNet
mean/std. It is written with torch ops only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.core.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Conv2dNormActivation",
    "InvertedResidual",
    "MobileNetV2",
    "to_float_chw",
    "resize_shorter_side",
    "center_crop",
    "normalize_imagenet",
    "imagenet_preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class Conv2dNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6, "same" padding for odd kernels."""

    def __init__(self, cin: int, cout: int, *, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1); residual when shapes allow."""

    def __init__(self, cin: int, cout: int, *, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"InvertedResidual stride={stride!r} is invalid; valid strides are 1 and 2")
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(cin, hidden, kernel_size=1))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier 1.0 and torchvision's parameter names.

    Input [N, 3, H, W] normalized images; output [N, num_classes] logits.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"MobileNetV2 num_classes={num_classes!r} is invalid; it must be >= 1")
        cin = 32
        last = 1280
        features: list[nn.Module] = [Conv2dNormActivation(3, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, stride=s if i == 0 else 1, expand_ratio=t))
                cin = c
        features.append(Conv2dNormActivation(cin, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation; it only matters when no state dict is loaded.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [N, 1280, H/32, W/32]
        x = F.adaptive_avg_pool2d(x, 1)  # [N, 1280, 1, 1]
        x = torch.flatten(x, 1)  # [N, 1280]
        return self.classifier(x)  # [N, num_classes]


# ---- preprocessing ------------------------------------------------------------------------


def to_float_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A decoded image as float32 [3, H, W] in [0, 1].

    Accepts uint8/bool/float arrays shaped [H, W] (gray, replicated to 3 channels),
    [H, W, 3] or [H, W, 4] (alpha dropped). Float input must already lie in [0, 1].
    """
    x = torch.tensor(np.asarray(image))  # a copy: decoded arrays may be read-only
    if x.ndim == 2:
        x = x.unsqueeze(-1).expand(*x.shape, 3)  # [H, W] -> [H, W, 3]
    if x.ndim != 3 or x.shape[-1] not in (3, 4):
        raise ConfigError(
            f"image of shape {tuple(x.shape)} is not an image; expected [H, W], [H, W, 3] or [H, W, 4]"
        )
    x = x[..., :3]  # [H, W, 3]
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.dtype == torch.bool:
        x = x.float()
    else:
        x = x.float()
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ConfigError(
                f"float image has values in [{x.min().item():.3g}, {x.max().item():.3g}]; expected [0, 1]"
            )
    return x.permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]


def resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of [C, H, W] so that min(H, W) == size (aspect kept)."""
    if size < 1:
        raise ConfigError(f"resize size={size!r} is invalid; it must be >= 1")
    _, h, w = image.shape
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    out = F.interpolate(
        image.unsqueeze(0), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
    )  # [1, C, new_h, new_w]
    return out.squeeze(0)  # [C, new_h, new_w]


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of [C, H, W] (torchvision's rounding of the offsets)."""
    _, h, w = image.shape
    if h < size or w < size:
        raise ConfigError(f"center_crop size={size} is larger than the image ({h}x{w})")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image[:, top : top + size, left : left + size]


def normalize_imagenet(image: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel; image [..., 3, H, W] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)  # [3, 1, 1]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)  # [3, 1, 1]
    return (image - mean) / std


def imagenet_preprocess(
    images: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    *,
    resize: int = 256,
    crop: int = 224,
) -> torch.Tensor:
    """torchvision's ImageNet eval transform for one image or a list: returns [N, 3, crop, crop]."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    if len(images) == 0:
        raise ConfigError("imagenet_preprocess got no images; pass at least one [H, W, 3] array")
    batch = [normalize_imagenet(center_crop(resize_shorter_side(to_float_chw(im), resize), crop)) for im in images]
    return torch.stack(batch)  # [N, 3, crop, crop]
