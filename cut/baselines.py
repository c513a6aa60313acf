"""Trivial predictors: the floor any trained model must clear.

Per task, one constant prediction estimated on the training split: the majority class
(segmentation: per pixel; classification: per image), the mean valid depth, the mean normal direction.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cut.train import make_loader


def _constant_predictions(train_set: Dataset, max_batches: int = 50) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    for i, (_, targets) in enumerate(make_loader(train_set, 64)):
        if i >= max_batches:
            break
        for spec in train_set.tasks:
            t = targets[spec.name]
            if spec.kind in ("segmentation", "classification"):
                valid = (t != spec.ignore_index) & (t >= 0) if spec.kind == "segmentation" else torch.ones_like(t, dtype=torch.bool)
                hist = torch.bincount(t[valid].long().flatten(), minlength=spec.num_classes)[: spec.num_classes]
                sums[spec.name] = sums.get(spec.name, 0) + hist.double()
            elif spec.kind == "depth":
                valid = torch.isfinite(t) & (t > 0)
                sums[spec.name] = sums.get(spec.name, 0) + t[valid].double().sum()
                counts[spec.name] = counts.get(spec.name, 0) + float(valid.sum())
            elif spec.kind == "normals":
                sums[spec.name] = sums.get(spec.name, 0) + t.double().sum(dim=(0, 2, 3))
    out = {}
    for spec in train_set.tasks:
        if spec.kind in ("segmentation", "classification"):
            out[spec.name] = torch.tensor(int(sums[spec.name].argmax()))
        elif spec.kind == "depth":
            out[spec.name] = torch.tensor(float(sums[spec.name] / max(counts[spec.name], 1)))
        else:
            out[spec.name] = torch.nn.functional.normalize(sums[spec.name].float(), dim=0)
    return out


def trivial_metrics(train_set: Dataset, test_set: Dataset) -> dict[str, dict[str, float]]:
    """task -> metrics of the constant predictor on the test split."""
    constants = _constant_predictions(train_set)
    meters = {spec.name: spec.make_metric() for spec in test_set.tasks}
    for _, targets in make_loader(test_set, 64):
        for spec in test_set.tasks:
            t = targets[spec.name]
            c = constants[spec.name]
            if spec.kind in ("segmentation", "classification"):
                pred = torch.full_like(t, int(c))
            elif spec.kind == "depth":
                pred = torch.full_like(t, float(c))
            else:
                pred = c.view(1, 3, 1, 1).expand_as(t).clone()
            meters[spec.name].update(pred, t)
    return {name: m.compute() for name, m in meters.items()}
