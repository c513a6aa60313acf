"""A folder of unlabelled images, normalised as a dataset's training images were: data a server may hold
for recovery (distillation needs no labels). Items are (image, {}): no task has a target."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageFolder(Dataset):
    """Every PNG/JPG under `directory` (sorted), resized to `size` and normalised like `dataset`'s images."""

    def __init__(self, directory: str | Path, dataset: str, size: tuple[int, int], channels: int,
                 dataset_kwargs: dict | None = None) -> None:
        from cut.export import normalisation_for

        self.root = Path(directory)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such image directory")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"{self.root}: holds no .png or .jpg image")
        norm = normalisation_for(dataset, dataset_kwargs)
        if norm is None:
            raise ValueError(f"no pixel normalisation is known for dataset {dataset!r}")
        self.sidecar = {"input": {"channels": channels, "height": int(size[0]), "width": int(size[1])},
                        "normalisation": norm}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        from cut.infer import load_image, preprocess

        return torch.from_numpy(preprocess(load_image(self.paths[index]), self.sidecar)[0]), {}


__all__ = ["ImageFolder"]
