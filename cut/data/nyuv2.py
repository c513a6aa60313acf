"""NYUv2 (seg / normals / depth) in the preprocessed format the AdaShare and DiSparse loaders read.

Layout: `<data_dir>/nyu_v2_3task.json` (or `json_path`) holds {"train": [...], "test": [...]}, each entry
`[image, seg, normal, depth]` (a dict with those keys is accepted too), paths relative to `data_dir`.
- image: 8-bit RGB PNG/JPG (usually 480x640). Loaded in BGR order with the BGR mean
  (104.01, 116.67, 122.68) subtracted and *not* divided by 255, as DiSparse does; we then divide by a
  constant `std` (default 58, roughly the pixel std of natural images) so the input is near unit
  variance like every other dataset here. `std=1.0` gives DiSparse's exact input scale.
- seg: grayscale PNG, classes 0..39, 255 ignore; any other value is an error (wrong format).
- normal: 3-channel uint8 PNG mapped to [-1, 1] and renormalised to unit length, channels kept in the
  file's order; a pixel with any channel equal to 255 is invalid and becomes the zero vector.
- depth: .npy (H x W, H x W x 1 or 1 x H x W); values <= 0 or non-finite become NaN.

`size=(H, W)` resizes every sample (bilinear for the image, nearest for the targets); without it every
image must have the size of the first one. `attribute(i)` is the most frequent valid class of the seg
map, decoded on first use and cached.

The helpers below are shared with the Cityscapes and Taskonomy loaders, which use the same family of
formats.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from cut.data import register
from cut.tasks import TaskSpec

BGR_MEAN = np.array((104.00698793, 116.66876762, 122.67891434), dtype=np.float32)
IMAGE_STD = 58.0
IGNORE = 255
NYU_CLASSES = 40


# ---------------------------------------------------------------- helpers shared by the loaders


def require_dir(data_dir: str | Path | None, dataset: str) -> Path:
    """The dataset root, with a clear error when it is not given or does not exist."""
    if data_dir is None:
        raise ValueError(f"{dataset} needs data_dir (the folder holding the preprocessed dataset)")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} data_dir {root} does not exist")
    return root


def load_split(json_path: Path, split: str, dataset: str) -> list[Any]:
    """The sample list of `split` from a DiSparse-style JSON index."""
    if not json_path.is_file():
        raise FileNotFoundError(f"{dataset} index file {json_path} does not exist")
    with open(json_path) as f:
        info = json.load(f)
    if not isinstance(info, dict) or split not in info:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{json_path}: no {split!r} list (found {keys})")
    entries = info[split]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{json_path}: {split!r} must be a non-empty list of samples")
    return entries


def resolve(root: Path, rel: str) -> Path:
    """A sample path from the index: relative to the root (a leading '/' is tolerated, as in some
    published JSONs meant for string concatenation), or absolute when it exists as such."""
    p = Path(rel)
    if p.is_absolute() and p.exists():
        return p
    return root / rel.lstrip("/")


def check_files(paths: Sequence[Path], dataset: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{dataset}: missing file(s) {', '.join(missing)}")


def bgr_image(rgb: np.ndarray, std: float) -> torch.Tensor:
    """RGB H x W x 3 in 0..255 -> 3 x H x W float32, BGR order, BGR mean subtracted, divided by std."""
    bgr = rgb[:, :, ::-1].astype(np.float32)
    return torch.from_numpy(((bgr - BGR_MEAN) / std).transpose(2, 0, 1).copy())


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_plane(path: Path) -> np.ndarray:
    """A single-channel image as stored (8-bit grey, palette indices or 16-bit values)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr[:, :, 0] if arr.ndim == 3 else arr


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, reading only its header."""
    with Image.open(path) as im:
        w, h = im.size
    return h, w


def as_plane(arr: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze H x W x 1 or 1 x H x W arrays to H x W."""
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected an H x W map, got shape {arr.shape}")
    return arr


def seg_target(labels: np.ndarray, num_classes: int, path: Path) -> torch.Tensor:
    """Validated long H x W labels: 0..num_classes-1 or IGNORE."""
    labels = labels.astype(np.int64)
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"{path}: label {int(labels[bad][0])} outside 0..{num_classes - 1} (ignore is {IGNORE})"
        )
    return torch.from_numpy(labels)


def unit_normals(vectors: np.ndarray, invalid: np.ndarray) -> torch.Tensor:
    """H x W x 3 vectors in [-1, 1] -> 3 x H x W unit vectors, zero where invalid or degenerate."""
    length = np.linalg.norm(vectors, axis=-1, keepdims=True)
    bad = invalid | (length[..., 0] < 1e-6)
    unit = np.where(bad[..., None], 0.0, vectors / np.maximum(length, 1e-6)).astype(np.float32)
    return torch.from_numpy(unit.transpose(2, 0, 1).copy())


def depth_target(depth: np.ndarray, valid: np.ndarray) -> torch.Tensor:
    """1 x H x W float32 depth, NaN where not valid (or not finite)."""
    depth = depth.astype(np.float32)
    out = np.where(valid & np.isfinite(depth), depth, np.float32(np.nan)).astype(np.float32)
    return torch.from_numpy(out[None])


def resize_targets(targets: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Nearest-neighbour resizing of every dense target, so labels, NaNs and zero normals survive."""
    out = {}
    for name, t in targets.items():
        if t.dim() < 2 or tuple(t.shape[-2:]) == tuple(size):
            out[name] = t
            continue
        x = t.reshape(1, -1, *t.shape[-2:]).float()
        y = F.interpolate(x, size=tuple(size), mode="nearest").reshape(*t.shape[:-2], *size)
        out[name] = y.to(t.dtype)
    return out


def resize_sample(
    image: torch.Tensor, targets: dict[str, torch.Tensor], size: tuple[int, int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bilinear (antialiased) for the image, nearest for the targets."""
    if tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(
            image[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True
        )[0]
    return image, resize_targets(targets, size)


def dominant_class(labels: np.ndarray, num_classes: int) -> int:
    """Most frequent valid class of a label map (0 when none is valid): a cheap scene descriptor."""
    valid = labels[(labels >= 0) & (labels < num_classes)].astype(np.int64)
    if valid.size == 0:
        return 0
    return int(np.bincount(valid.ravel(), minlength=num_classes).argmax())


def entry_paths(entry: Any, keys: Sequence[str], aliases: dict[str, str], where: str) -> list[str]:
    """Paths of one index entry in `keys` order, from a list/tuple or a dict (keys or their aliases)."""
    if isinstance(entry, dict):
        named = {aliases.get(k, k): v for k, v in entry.items()}
        missing = [k for k in keys if k not in named]
        if missing:
            raise ValueError(f"{where}: entry lacks {missing} (has {sorted(entry)})")
        values = [named[k] for k in keys]
    elif isinstance(entry, (list, tuple)) and len(entry) == len(keys):
        values = list(entry)
    else:
        raise ValueError(f"{where}: expected [{', '.join(keys)}] or a dict with those keys, got {entry!r}")
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: paths must be strings, got {values!r}")
    return values


# ---------------------------------------------------------------- NYUv2


class NYUv2Dataset(Dataset):
    """NYUv2 with 40-class segmentation, surface normals and depth; see the module docstring."""

    KEYS = ("image", "seg", "normal", "depth")

    def __init__(
        self,
        split: str,
        data_dir: str | Path | None,
        json_path: str | Path | None = None,
        size: tuple[int, int] | None = None,
        std: float = IMAGE_STD,
    ) -> None:
        self.root = require_dir(data_dir, "NYUv2")
        index = Path(json_path) if json_path is not None else self.root / "nyu_v2_3task.json"
        entries = load_split(index, split, "NYUv2")
        aliases = {"img": "image", "label": "seg", "normals": "normal"}
        self.samples = [
            [resolve(self.root, p) for p in entry_paths(e, self.KEYS, aliases, f"{index} {split}[{i}]")]
            for i, e in enumerate(entries)
        ]
        check_files(self.samples[0], "NYUv2")  # fail at construction, not mid-training, on a wrong root
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std = float(std)
        self.size = tuple(size) if size is not None else None
        self.input_size = self.size or image_size(self.samples[0][0])
        self.in_channels = 3
        self.tasks = (
            TaskSpec("seg", "segmentation", num_classes=NYU_CLASSES, ignore_index=IGNORE),
            TaskSpec("normals", "normals"),
            TaskSpec("depth", "depth"),
        )
        self._attributes: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def attribute(self, i: int) -> int:
        if i not in self._attributes:
            seg_path = self.samples[i][1]
            self._attributes[i] = dominant_class(read_plane(seg_path).astype(np.int64), NYU_CLASSES)
        return self._attributes[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img_path, seg_path, normal_path, depth_path = self.samples[i]
        check_files(self.samples[i], "NYUv2")
        image = bgr_image(read_rgb(img_path), self.std)
        seg = seg_target(read_plane(seg_path), NYU_CLASSES, seg_path)
        with Image.open(normal_path) as im:
            raw = np.asarray(im.convert("RGB"))
        normals = unit_normals(raw.astype(np.float32) / 255.0 * 2.0 - 1.0, (raw == 255).any(-1))
        depth = as_plane(np.load(depth_path), depth_path)
        targets = {"seg": seg, "normals": normals, "depth": depth_target(depth, depth > 0)}
        shape = tuple(image.shape[-2:])
        for name, t in targets.items():
            if tuple(t.shape[-2:]) != shape:
                raise ValueError(f"NYUv2 sample {i}: {name} is {tuple(t.shape[-2:])}, image is {shape}")
        if self.size is not None:
            return resize_sample(image, targets, self.size)
        if shape != tuple(self.input_size):
            raise ValueError(f"NYUv2 sample {i} is {shape}, not {self.input_size}; pass size=(H, W)")
        return image, targets


@register("nyuv2")
def NYUv2(
    split: str = "train",
    data_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    size: tuple[int, int] | None = None,
    std: float = IMAGE_STD,
) -> NYUv2Dataset:
    """Build NYUv2 from a DiSparse/AdaShare-style root (`data_dir` required)."""
    return NYUv2Dataset(split, data_dir, json_path=json_path, size=size, std=std)
