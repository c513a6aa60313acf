"""MultiFashion: two real Fashion-MNIST garments on one canvas, a small real-image multi-task set.

Each sample overlays two 28x28 items on a `size` x `size` grey canvas (pixelwise max): the *left* item
sits towards the top-left, the *right* item towards the bottom-right, each shifted by up to 4 px. Three
tasks share the image: classify the left item, classify the right item, and `layout`, a 3-class
segmentation saying which garment each pixel belongs to (0 background, 1 left, 2 right; where both
items are lit the brighter one wins, ties go to the left item). The tasks conflict in the shared
features (two classifiers look at different regions), which is what multi-task pruning needs.

Pairs and shifts are fixed by (seed, split) and the sample index, so every client and every run sees
the same data; canvases are composed on the fly from the uint8 arrays, so `ds[i]` stays cheap.

Data: the four IDX files of Fashion-MNIST (gzipped or not), read with numpy; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cut.data import register
from cut.tasks import TaskSpec

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
ITEM = 28  # Fashion-MNIST item side
MAX_SHIFT = 4
# Pixel statistics of 36x36 canvases built from the training split (grey level / 255).
PIXEL_MEAN = 0.2751
PIXEL_STD = 0.3616

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (uint8 payload, as Fashion-MNIST uses), gzipped when the name ends in .gz."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file with uint8 data")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    array = np.frombuffer(data, dtype=np.uint8, offset=header)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} but holds {array.size} values")
    return array.reshape(dims)


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _cached_idx(path: Path) -> np.ndarray:
    """Each client builds its own dataset object; the 47 MB train array is parsed once per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        _CACHE[key] = read_idx(path)
    return _CACHE[key]


def load_fashion_mnist(split: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 28 x 28 uint8) and labels (N uint8) of one split."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DIR
    stems = _FILES[split]
    paths = [_find(directory, stem) for stem in stems]
    if any(p is None for p in paths):
        missing = [str(directory / (s + ".gz")) for s, p in zip(stems, paths, strict=True) if p is None]
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            f"'apt-get install dataset-fashion-mnist' (files go to {DEFAULT_DIR}), or pass --data-dir "
            "pointing at a folder holding the four IDX files (train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)."
        )
    images, labels = (_cached_idx(p) for p in paths)  # type: ignore[arg-type]
    if images.ndim != 3 or images.shape[1:] != (ITEM, ITEM) or labels.ndim != 1:
        raise ValueError(f"{paths[0]}: expected N x {ITEM} x {ITEM} images and N labels")
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
    if len(images) < 2:
        raise ValueError(f"{paths[0]}: need at least two items to make pairs")
    return images, labels


class MultiFashionDataset(Dataset):
    """Pairs of Fashion-MNIST items; see the module docstring."""

    def __init__(
        self,
        split: str,
        images: np.ndarray,
        labels: np.ndarray,
        num_samples: int | None = None,
        seed: int = 0,
        size: int = 36,
    ) -> None:
        if size < ITEM:
            raise ValueError(f"size must be at least {ITEM}, got {size}")
        n_items = len(labels)
        n = n_items if num_samples is None else int(num_samples)
        if n < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.split = split
        self.size = size
        self._images = images
        self._labels = labels
        # Train and test draw from different streams so the same seed does not pair them alike.
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        self._left = np.arange(n) % n_items
        partner = rng.integers(0, n_items - 1, size=n)
        self._right = partner + (partner >= self._left)  # any item but the left one
        self._shifts = rng.integers(0, min(MAX_SHIFT, size - ITEM) + 1, size=(n, 4))
        self.tasks = (
            TaskSpec("left", "classification", num_classes=10, class_names=CLASS_NAMES),
            TaskSpec("right", "classification", num_classes=10, class_names=CLASS_NAMES),
            TaskSpec("layout", "segmentation", num_classes=3, class_names=("background", "left", "right")),
        )
        self.input_size = (size, size)
        self.in_channels = 1

    def __len__(self) -> int:
        return len(self._left)

    def attribute(self, i: int) -> int:
        """The left item's class: the label-skew handle for Dirichlet partitioning."""
        return int(self._labels[self._left[i]])

    def canvas(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw uint8 canvases of (combined, left item alone, right item alone) for sample i."""
        s, far = self.size, self.size - ITEM
        dy_l, dx_l, dy_r, dx_r = (int(v) for v in self._shifts[i])
        left = np.zeros((s, s), dtype=np.uint8)
        right = np.zeros((s, s), dtype=np.uint8)
        left[dy_l : dy_l + ITEM, dx_l : dx_l + ITEM] = self._images[self._left[i]]
        right[far - dy_r : far - dy_r + ITEM, far - dx_r : far - dx_r + ITEM] = self._images[self._right[i]]
        return np.maximum(left, right), left, right

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i = i % len(self)
        combined, left, right = self.canvas(i)
        layout = np.where(combined == 0, 0, np.where(left >= right, 1, 2))
        image = (combined.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
        targets = {
            "left": torch.tensor(int(self._labels[self._left[i]]), dtype=torch.long),
            "right": torch.tensor(int(self._labels[self._right[i]]), dtype=torch.long),
            "layout": torch.from_numpy(layout.astype(np.int64)),
        }
        return torch.from_numpy(image).unsqueeze(0), targets


@register("multifashion")
def MultiFashion(
    split: str = "train",
    data_dir: str | Path | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    size: int = 36,
) -> MultiFashionDataset:
    """Build MultiFashion: one pair per Fashion-MNIST item by default (60000 train, 10000 test)."""
    images, labels = load_fashion_mnist(split, data_dir)
    return MultiFashionDataset(split, images, labels, num_samples=num_samples, seed=seed, size=size)
