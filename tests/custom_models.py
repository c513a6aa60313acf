"""Users' own multi-task models for the API tests (not zoo models): torchvision trunks with a dense head and a
classification head, a conv + transformer-encoder hybrid and a tiny ViT. Each builder is a factory that
`cut.save_compact` can name ("custom_models:resnet18"; tests/ is on sys.path under pytest)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


class TrunkNet(nn.Module):
    """A torchvision trunk, a segmentation head (3x3 conv, BN, 1x1 conv, upsampled) and a classification head."""

    def __init__(self, trunk: nn.Module, channels: int, seg_classes: int = 5, num_classes: int = 4) -> None:
        super().__init__()
        self.trunk = trunk
        self.seg_head = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, seg_classes, 1))
        self.cls_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        seg = F.interpolate(self.seg_head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"seg": seg, "cls": self.cls_head(f)}


def resnet18() -> TrunkNet:
    r = torchvision.models.resnet18(weights=None)
    return TrunkNet(nn.Sequential(*list(r.children())[:-2]), 512)


def mobilenet_v2() -> TrunkNet:
    return TrunkNet(torchvision.models.mobilenet_v2(weights=None).features, 1280)


def efficientnet_b0() -> TrunkNet:
    return TrunkNet(torchvision.models.efficientnet_b0(weights=None).features, 1280)


class HybridNet(nn.Module):
    """Conv stem, one nn.TransformerEncoderLayer over the feature map's tokens, a dense and a class head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.block = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
        self.seg_head = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 5, 1))
        self.cls_head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.stem(x)
        b, c, h, w = f.shape
        tokens = self.block(f.flatten(2).transpose(1, 2))
        grid = tokens.transpose(1, 2).reshape(b, c, h, w)
        seg = F.interpolate(self.seg_head(grid), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"seg": seg, "cls": self.cls_head(tokens.mean(1))}


def hybrid() -> HybridNet:
    return HybridNet()


class TinyViT(nn.Module):
    """torchvision's VisionTransformer in a tiny configuration with a classification and a regression head."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                        hidden_dim=32, mlp_dim=64)
        self.vit.heads = nn.Identity()
        self.cls_head = nn.Linear(32, 4)
        self.reg_head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.vit(x)
        return {"cls": self.cls_head(f), "reg": self.reg_head(f).squeeze(1)}


def tiny_vit() -> TinyViT:
    return TinyViT()


def batches(n: int = 1, size: int = 32, batch: int = 2, seed: int = 0) -> list:
    """(images, {seg, cls, reg}) batches of random data."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=gen),
             {"seg": torch.randint(0, 5, (batch, size, size), generator=gen),
              "cls": torch.randint(0, 4, (batch,), generator=gen),
              "reg": torch.randn(batch, generator=gen)}) for _ in range(n)]
