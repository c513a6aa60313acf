"""Dataset registry: name -> builder, so the CLI, configs, scenarios and tests name datasets the same way.

Contract every dataset follows (a `torch.utils.data.Dataset`):
- `ds[i]` returns `(image, targets)`: image is a float32 tensor C x H x W (normalised), targets a dict
  task name -> tensor: segmentation long H x W (ignore label = the task's ignore_index), depth float
  1 x H x W (invalid pixels NaN), normals float 3 x H x W unit vectors (invalid pixels all zero),
  classification long scalar.
- `ds.tasks`: tuple of TaskSpec, `ds.input_size`: (H, W), `ds.in_channels`: int.
- `ds.attribute(i)`: a small int describing sample i (a label or scene type) used for non-IID
  partitioning; must be cheap (no image decoding where avoidable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

DATASETS: dict[str, Callable[..., Dataset]] = {}


def register(name: str):
    def deco(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        DATASETS[name] = builder
        return builder

    return deco


def get_dataset(name: str, split: str = "train", **kwargs: Any) -> Dataset:
    """Build dataset `name` for `split` ('train' or 'test'); kwargs go to the dataset's builder."""
    _load_builtin()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {','.join(sorted(DATASETS))}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    return DATASETS[name](split=split, **kwargs)


def dataset_names() -> list[str]:
    _load_builtin()
    return sorted(DATASETS)


def _load_builtin() -> None:
    # Importing the modules registers them; done lazily so `import cut.data` stays cheap.
    import importlib

    for module in ("scenes", "multifashion", "nyuv2", "cityscapes", "taskonomy"):
        try:
            importlib.import_module(f"cut.data.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"cut.data.{module}":
                raise
