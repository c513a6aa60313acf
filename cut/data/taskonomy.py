"""Tiny-Taskonomy (seg / normals / depth) in the layout the AdaShare and DiSparse loaders read.

Layout: `<data_dir>/taskonomy.json` (or `json_path`) holds {"train": [...], "test": [...]}, each entry
`[rgb, semseg, normal, depth, keypoint, edge]` (a dict with those keys is accepted too; "image"/"seg"/
"normals"/"keypoints"/"edges" are accepted as aliases), paths relative to `data_dir`. All samples are
resized to `size` (default 256 x 256): bilinear for the image, nearest for the targets.
- rgb: 8-bit RGB PNG, turned into BGR minus the BGR mean, divided by `std` (see `cut.data.nyuv2`).
- semseg: 8-bit PNG, 0 = unlabelled -> 255 (ignore), k -> k - 1 for k = 1..17 (17 classes).
- normal: 8-bit RGB PNG, /255 then mapped to [-1, 1], renormalised to unit length; invalid (zero)
  where the depth is invalid, which is the mask the reference loaders use for normals.
- depth: 16-bit PNG d, target log(1 + d) / log(2^16); valid where d < 64500, NaN elsewhere.
- keypoint, edge: 16-bit PNGs, /2^16 then rescaled to [-1, 1] from the ranges [0, 0.005] and
  [0, 0.08] the reference loaders use (values clipped). They are *not* tasks yet: `cut.tasks` has no
  plain regression kind (the depth kind treats values <= 0 as invalid, which is wrong for [-1, 1]).
  Their paths are validated in the index and `extras(i)` decodes them, so adding the tasks later only
  needs a kind; `ds[i]` does not decode them, to keep loading cheap.

`attribute(i)` is the capture location: the index of the rgb file's folder among the sorted folders
of the split (Taskonomy stores one building per folder), read from the paths without decoding. When
all rgb files share one folder (or there are more than MAX_FOLDERS folders, so folders are not
buildings) it falls back to the most frequent class of the seg map (decoded on first use, cached).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cut.data import register
from cut.data.nyuv2 import (
    IGNORE,
    IMAGE_STD,
    bgr_image,
    check_files,
    depth_target,
    dominant_class,
    entry_paths,
    load_split,
    read_plane,
    read_rgb,
    require_dir,
    resize_sample,
    resize_targets,
    resolve,
    seg_target,
    unit_normals,
)
from cut.tasks import TaskSpec

TASKONOMY_CLASSES = 17
DEPTH_INVALID_FROM = 64500
LOG_DEPTH_NORM = float(np.log(2.0**16))
EXTRA_RANGES = {"keypoint": 0.005, "edge": 0.08}  # upper end of the /2^16 value range mapped to +1
MAX_FOLDERS = 1000
KEYS = ("rgb", "semseg", "normal", "depth", "keypoint", "edge")
ALIASES = {
    "image": "rgb",
    "img": "rgb",
    "seg": "semseg",
    "normals": "normal",
    "keypoints": "keypoint",
    "edges": "edge",
}


def seg_labels(raw: np.ndarray) -> np.ndarray:
    """Taskonomy semseg values -> training labels: 0 becomes ignore, k becomes k - 1."""
    raw = raw.astype(np.int64)
    return np.where(raw == 0, IGNORE, raw - 1)


def depth_values(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-scaled depth, validity mask) from the raw 16-bit depth."""
    raw = raw.astype(np.float64)
    return (np.log1p(raw) / LOG_DEPTH_NORM).astype(np.float32), raw < DEPTH_INVALID_FROM


def rescale_extra(raw: np.ndarray, top: float) -> np.ndarray:
    """16-bit keypoint/edge values -> [-1, 1] over the value range [0, top] (clipped)."""
    x = np.clip(raw.astype(np.float32) / 2.0**16, 0.0, top) / top
    return x * 2.0 - 1.0


class TaskonomyDataset(Dataset):
    """Tiny-Taskonomy with 17-class segmentation, normals and depth; see the module docstring."""

    def __init__(
        self,
        split: str,
        data_dir: str | Path | None,
        json_path: str | Path | None = None,
        size: tuple[int, int] = (256, 256),
        std: float = IMAGE_STD,
    ) -> None:
        self.root = require_dir(data_dir, "Taskonomy")
        index = Path(json_path) if json_path is not None else self.root / "taskonomy.json"
        entries = load_split(index, split, "Taskonomy")
        self.samples = [
            [resolve(self.root, p) for p in entry_paths(e, KEYS, ALIASES, f"{index} {split}[{i}]")]
            for i, e in enumerate(entries)
        ]
        check_files(self.samples[0], "Taskonomy")
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std = float(std)
        self.size = (int(size[0]), int(size[1]))
        self.input_size = self.size
        self.in_channels = 3
        self.tasks = (
            TaskSpec("seg", "segmentation", num_classes=TASKONOMY_CLASSES, ignore_index=IGNORE),
            TaskSpec("normals", "normals"),
            TaskSpec("depth", "depth"),
        )
        folders = [str(s[0].parent) for s in self.samples]
        ids = {name: k for k, name in enumerate(sorted(set(folders)))}
        # A few hundred buildings at most; one folder (or one per sample) says nothing about the scene.
        self._folder_ids = [ids[f] for f in folders] if 1 < len(ids) <= MAX_FOLDERS else None
        self._attributes: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def attribute(self, i: int) -> int:
        if self._folder_ids is not None:
            return self._folder_ids[i]
        if i not in self._attributes:
            labels = seg_labels(read_plane(self.samples[i][1]))
            self._attributes[i] = dominant_class(labels, TASKONOMY_CLASSES)
        return self._attributes[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rgb_path, seg_path, normal_path, depth_path = self.samples[i][:4]
        check_files(self.samples[i][:4], "Taskonomy")
        image = bgr_image(read_rgb(rgb_path), self.std)
        seg = seg_target(seg_labels(read_plane(seg_path)), TASKONOMY_CLASSES, seg_path)
        depth, valid = depth_values(read_plane(depth_path))
        normals = unit_normals(read_rgb(normal_path).astype(np.float32) / 255.0 * 2.0 - 1.0, ~valid)
        targets = {"seg": seg, "normals": normals, "depth": depth_target(depth, valid)}
        shape = tuple(image.shape[-2:])
        for name, t in targets.items():
            if tuple(t.shape[-2:]) != shape:
                raise ValueError(f"Taskonomy sample {i}: {name} is {tuple(t.shape[-2:])}, image is {shape}")
        return resize_sample(image, targets, self.size)

    def extras(self, i: int) -> dict[str, torch.Tensor]:
        """Keypoint and edge maps of sample i, 1 x H x W in [-1, 1] at `size` (not tasks yet)."""
        paths = {"keypoint": self.samples[i][4], "edge": self.samples[i][5]}
        check_files(list(paths.values()), "Taskonomy")
        maps = {
            k: torch.from_numpy(rescale_extra(read_plane(p), EXTRA_RANGES[k])[None])
            for k, p in paths.items()
        }
        return resize_targets(maps, self.size)


@register("taskonomy")
def Taskonomy(
    split: str = "train",
    data_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    size: tuple[int, int] = (256, 256),
    std: float = IMAGE_STD,
) -> TaskonomyDataset:
    """Build Tiny-Taskonomy from a DiSparse/AdaShare-style root (`data_dir` required)."""
    return TaskonomyDataset(split, data_dir, json_path=json_path, size=size, std=std)
