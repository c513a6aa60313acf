"""Task heads: a small DeepLab/ASPP-style dense head and a classification head.

The dense head follows DiSparse's SceneNet head in shape (parallel dilated branches whose per-branch
predictions are summed), scaled down: each branch is conv3x3(dilation d) -> BN -> ReLU -> conv1x1 to the
task's output channels. The last conv of each branch is the task's classifier and is never pruned.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseHead(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, hidden: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=d, dilation=d, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, out_channels, 1),
            )
            for d in dilations
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](features)
        for branch in self.branches[1:]:
            out = out + branch(features)
        return out

    def classifiers(self) -> list[nn.Module]:
        return [b[-1] for b in self.branches]


class ClassificationHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.pool(features).flatten(1))))

    def classifiers(self) -> list[nn.Module]:
        return [self.fc2]
