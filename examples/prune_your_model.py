"""Prune your own multi-task model with cut: a torchvision ResNet-18 trunk with a segmentation head and a
depth head, pruned to 50% of its parameters, saved without pickle and loaded back.

    .venv/bin/python examples/prune_your_model.py [--out DIR]

The model below stands for yours: any nn.Module whose forward returns {task: output}. cut needs to know
which submodules are the heads of which task (`heads`); the rest is the shared trunk. The data are the
project's procedural `scenes` (seg + depth targets), as a plain DataLoader of (images, {task: target}).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so the factory below imports from the repository

import cut  # noqa: E402
from cut.data import get_dataset  # noqa: E402

FACTORY = "examples.prune_your_model:build"  # rebuilds the dense model when a saved compact model is loaded


class SegDepthNet(nn.Module):
    """Your model: a ResNet-18 trunk (torchvision, random weights), a 1x1-conv segmentation head and a depth head."""

    def __init__(self, num_classes: int = 8) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        self.trunk = nn.Sequential(*list(resnet.children())[:-2])  # everything up to the pooling: 512 channels
        self.seg_head = nn.Sequential(nn.Conv2d(512, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                                      nn.Conv2d(128, num_classes, 1))
        self.depth_head = nn.Sequential(nn.Conv2d(512, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)
        up = lambda y: F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        return {"seg": up(self.seg_head(features)), "depth": up(self.depth_head(features))}


def build() -> SegDepthNet:
    return SegDepthNet()


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = build()  # in real use: your trained model
    data = DataLoader(get_dataset("scenes", "train", num_samples=64), batch_size=16)

    # The lines that use cut:
    compact, report = cut.prune(model, {"seg": "segmentation", "depth": "regression"}, budget=0.5, data=data,
                                heads={"seg": "seg_head", "depth": "depth_head"})
    print(report.summary())
    cut.save_compact(compact, report.plan, out, factory=FACTORY)
    loaded = cut.load_compact(out)
    images, _ = next(iter(data))
    print(type(loaded).__name__, {task: tuple(y.shape) for task, y in loaded(images).items()})

    same = all(torch.equal(a, b) for a, b in zip(compact.eval()(images).values(), loaded(images).values(), strict=True))
    print(f"saved to {out}; the loaded model gives the same outputs: {same}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for the compact model (default: a temporary one)")
    args = parser.parse_args()
    if args.out is not None:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "compact")
