"""Backbones: DeepLab-style dilated ResNet-18/34 with a width multiplier, and dilated MobileNetV2.

Both come from torchvision building blocks. ResNets use torchvision's layer naming (conv1, bn1, layerN.i,
downsample) so ImageNet weights of the full-width model load by name; torchvision's BasicBlock refuses
dilation > 1, so the block here is a small dilated equivalent. Every backbone exposes `out_channels`
and `output_stride`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _round_width(channels: int, mult: float, divisor: int = 8) -> int:
    return max(divisor, int(channels * mult + divisor / 2) // divisor * divisor)


class DilatedBasicBlock(nn.Module):
    """ResNet BasicBlock (two 3x3 convs + identity) that accepts a dilation."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """ResNet trunk without the classifier; layer3/layer4 dilated instead of strided (output stride 8).

    With output_stride=16 only layer4 is dilated. `in_channels` allows non-RGB inputs (e.g. grey images).
    `stem_pool=False` drops the stem's max-pool (halving the output stride) for small inputs such as
    36x36 canvases, where output stride 8 would leave a 5x5 feature map.
    """

    def __init__(
        self,
        layers: list[int],
        width: float = 1.0,
        output_stride: int = 8,
        in_channels: int = 3,
        stem_pool: bool = True,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        widths = [_round_width(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        strides = [1, 2, 1, 1] if output_stride == 8 else [1, 2, 2, 1]
        dilations = [1, 1, 2, 4] if output_stride == 8 else [1, 1, 1, 2]
        self.inplanes = widths[0]
        for i, (n, w, s, d) in enumerate(zip(layers, widths, strides, dilations, strict=True), start=1):
            setattr(self, f"layer{i}", self._make_layer(w, n, s, d))
        self.out_channels = widths[3]
        self.output_stride = output_stride if stem_pool else output_stride // 2

    def _make_layer(self, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        first_dilation = max(1, dilation // 2)
        layers = [DilatedBasicBlock(self.inplanes, planes, stride, first_dilation, downsample)]
        self.inplanes = planes
        layers += [DilatedBasicBlock(planes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DilatedMobileNetV2(nn.Module):
    """torchvision MobileNetV2 features with the last strides turned into dilations (output stride 8/16).

    The final 1x1 expansion to 1280 channels is kept (as in torchvision's `features`), so ImageNet
    weights load unchanged into `features`.
    """

    def __init__(self, width: float = 1.0, output_stride: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        # Imported here: torchvision costs ~1.4 s of import time (torch._dynamo), which every ResNet user
        # (each deployed ClientApp process) would otherwise pay.
        from torchvision.models import mobilenet_v2
        from torchvision.models.mobilenetv2 import InvertedResidual

        self.features = mobilenet_v2(weights=None, width_mult=width).features
        if in_channels != 3:
            first = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 2, 1, bias=False)
        current_stride, dilation = 1, 1
        for block in self.features:
            conv = _first_strided_conv(block)
            if conv is None:
                continue
            if current_stride >= output_stride:
                conv.stride = (1, 1)
                dilation *= 2
            else:
                current_stride *= 2
            if isinstance(block, InvertedResidual) and dilation > 1:
                for m in block.modules():
                    if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                        m.dilation = (dilation, dilation)
                        m.padding = (dilation, dilation)
        self.out_channels = self.features[-1][0].out_channels
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _first_strided_conv(block: nn.Module) -> nn.Conv2d | None:
    for m in block.modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            return m
    return None


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda width, output_stride, in_channels, stem_pool=True: DilatedResNet(
        [2, 2, 2, 2], width, output_stride, in_channels, stem_pool),
    "resnet34": lambda width, output_stride, in_channels, stem_pool=True: DilatedResNet(
        [3, 4, 6, 3], width, output_stride, in_channels, stem_pool),
    "mobilenet_v2": lambda width, output_stride, in_channels, stem_pool=True: DilatedMobileNetV2(
        width, output_stride, in_channels),
}
