"""Cityscapes (19-class segmentation and depth) in the .npy format the AdaShare and DiSparse loaders read.

Layout: `<data_dir>/cityscape.json` (DiSparse's name; or `json_path`) holds {"train": [...], "test": [...]}
with paths relative to `data_dir`. Each entry may be
- a dict {"image": ..., "label": ..., "depth": ...} ("label19" and "seg" are accepted for "label",
  "img" for "image");
- a list of five paths `[image, depth, label2, label7, label19]`, the order of DiSparse's
  cityscape.json (only the 19-class label is used);
- a list of three paths: the image first, then the depth and label maps in either order, told apart
  by "depth" and "label"/"seg" in their paths (an error when the names do not say which is which).

Arrays (usually 256 x 512 = H x W):
- image: H x W x 3 RGB floats in [0, 1]; turned into BGR x 255 minus the BGR mean, as DiSparse does,
  then divided by a constant `std` (see `cut.data.nyuv2`; `std=1.0` keeps DiSparse's scale);
- label: H x W (or x 1) ints, 0..18 and -1 ignore; negative values become 255 (the task's ignore_index);
- depth: H x W (or x 1); valid where depth > 3e-5, NaN elsewhere.

`attribute(i)` is the most frequent valid class of the label map (a memory-mapped .npy read, cached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cut.data import register
from cut.data.nyuv2 import (
    IGNORE,
    IMAGE_STD,
    as_plane,
    bgr_image,
    check_files,
    depth_target,
    dominant_class,
    entry_paths,
    load_split,
    require_dir,
    resize_sample,
    resolve,
    seg_target,
)
from cut.tasks import TaskSpec

CITYSCAPES_CLASSES = 19
MIN_DEPTH = 3e-5


def _entry(entry: Any, where: str) -> list[str]:
    """(image, label, depth) paths of one index entry in any accepted layout."""
    keys = ("image", "label", "depth")
    if isinstance(entry, (list, tuple)) and len(entry) == 5:
        image, depth, _label2, _label7, label19 = entry
        entry = {"image": image, "label": label19, "depth": depth}
    elif isinstance(entry, (list, tuple)) and len(entry) == 3:
        image, a, b = entry
        if not all(isinstance(v, str) for v in entry):
            raise ValueError(f"{where}: paths must be strings, got {entry!r}")
        a_depth, b_depth = "depth" in a.lower(), "depth" in b.lower()
        a_label = "label" in a.lower() or "seg" in a.lower()
        b_label = "label" in b.lower() or "seg" in b.lower()
        if a_depth and b_label and not (b_depth or a_label):
            entry = {"image": image, "label": b, "depth": a}
        elif b_depth and a_label and not (a_depth or b_label):
            entry = {"image": image, "label": a, "depth": b}
        else:
            raise ValueError(
                f"{where}: cannot tell the depth from the label path in {entry!r}; "
                'use {"image": ..., "label": ..., "depth": ...}'
            )
    aliases = {"img": "image", "label19": "label", "seg": "label"}
    return entry_paths(entry, keys, aliases, where)


class CityscapesDataset(Dataset):
    """Cityscapes with 19-class segmentation and depth; see the module docstring."""

    def __init__(
        self,
        split: str,
        data_dir: str | Path | None,
        json_path: str | Path | None = None,
        size: tuple[int, int] | None = None,
        std: float = IMAGE_STD,
    ) -> None:
        self.root = require_dir(data_dir, "Cityscapes")
        index = Path(json_path) if json_path is not None else self.root / "cityscape.json"
        entries = load_split(index, split, "Cityscapes")
        self.samples = [
            [resolve(self.root, p) for p in _entry(e, f"{index} {split}[{i}]")] for i, e in enumerate(entries)
        ]
        check_files(self.samples[0], "Cityscapes")
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std = float(std)
        self.size = tuple(size) if size is not None else None
        first = np.load(self.samples[0][0], mmap_mode="r")
        self.input_size = self.size or (int(first.shape[0]), int(first.shape[1]))
        self.in_channels = 3
        self.tasks = (
            TaskSpec("seg", "segmentation", num_classes=CITYSCAPES_CLASSES, ignore_index=IGNORE),
            TaskSpec("depth", "depth"),
        )
        self._attributes: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def attribute(self, i: int) -> int:
        if i not in self._attributes:
            path = self.samples[i][1]
            labels = as_plane(np.load(path, mmap_mode="r"), path)
            self._attributes[i] = dominant_class(np.rint(labels).astype(np.int64), CITYSCAPES_CLASSES)
        return self._attributes[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img_path, label_path, depth_path = self.samples[i]
        check_files(self.samples[i], "Cityscapes")
        rgb = np.load(img_path)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"{img_path}: expected an H x W x 3 RGB array, got shape {rgb.shape}")
        image = bgr_image(rgb.astype(np.float32) * 255.0, self.std)
        labels = np.rint(as_plane(np.load(label_path), label_path)).astype(np.int64)
        labels[labels < 0] = IGNORE
        depth = as_plane(np.load(depth_path), depth_path)
        targets = {
            "seg": seg_target(labels, CITYSCAPES_CLASSES, label_path),
            "depth": depth_target(depth, depth > MIN_DEPTH),
        }
        shape = tuple(image.shape[-2:])
        for name, t in targets.items():
            if tuple(t.shape[-2:]) != shape:
                raise ValueError(f"Cityscapes sample {i}: {name} is {tuple(t.shape[-2:])}, image is {shape}")
        if self.size is not None:
            return resize_sample(image, targets, self.size)
        if shape != tuple(self.input_size):
            raise ValueError(f"Cityscapes sample {i} is {shape}, not {self.input_size}; pass size=(H, W)")
        return image, targets


@register("cityscapes")
def Cityscapes(
    split: str = "train",
    data_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    size: tuple[int, int] | None = None,
    std: float = IMAGE_STD,
) -> CityscapesDataset:
    """Build Cityscapes from a DiSparse/AdaShare-style root (`data_dir` required)."""
    return CityscapesDataset(split, data_dir, json_path=json_path, size=size, std=std)
