"""Per-task metrics and the multi-task delta, exactly as EVALUATION.md defines them.

Metrics accumulate over batches (a confusion matrix, running sums), so a whole evaluation set is scored
without holding every prediction in memory. Invalid pixels (ignore labels, invalid depth, zero normals)
are masked out of every metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


class SegmentationMetric:
    """mIoU over the classes present in the evaluated ground truth, and pixel accuracy.

    Classes that never occur in the ground truth are excluded from the mean; classes that occur but are
    never predicted count with IoU 0 (unlike DiSparse's code, which drops them and inflates mIoU).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits_or_labels: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits_or_labels.argmax(1) if logits_or_labels.dim() == target.dim() + 1 else logits_or_labels
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        idx = target[valid].long() * self.num_classes + pred[valid].long()
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def compute(self) -> dict[str, float]:
        conf = self.confusion.double()
        true_per_class = conf.sum(1)
        present = true_per_class > 0
        inter = conf.diag()
        union = true_per_class + conf.sum(0) - inter
        iou = inter[present] / union[present]
        total = conf.sum()
        return {
            "miou": float(iou.mean() * 100) if present.any() else float("nan"),
            "pixel_acc": float(inter.sum() / total * 100) if total > 0 else float("nan"),
        }


class DepthMetric:
    """Mean absolute error, mean relative error and delta < 1.25 over valid (finite, > 0) pixels."""

    def __init__(self) -> None:
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.delta_hits = 0
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = pred.detach().double().reshape(target.shape)
        target = target.double()
        valid = torch.isfinite(target) & (target > 0)
        p, t = pred[valid], target[valid]
        self.abs_sum += float((p - t).abs().sum())
        self.rel_sum += float(((p - t).abs() / t).sum())
        ratio = torch.maximum(p / t, t / p.clamp_min(1e-12))
        self.delta_hits += int(((ratio < 1.25) & (p > 0)).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            return {"abs_err": float("nan"), "rel_err": float("nan"), "delta1": float("nan")}
        return {"abs_err": self.abs_sum / n, "rel_err": self.rel_sum / n, "delta1": self.delta_hits / n * 100}


class NormalsMetric:
    """Angle error in degrees between predicted and true unit normals over valid pixels.

    Valid pixels have a ground-truth normal of non-zero length. The median is computed from a histogram
    of 0.01-degree bins, so memory stays constant however many pixels are evaluated.
    """

    BINS = 18000  # 0.01-degree bins over [0, 180)

    def __init__(self) -> None:
        self.hist = torch.zeros(self.BINS, dtype=torch.int64)
        self.angle_sum = 0.0
        self.count = 0
        self.within = {"11.25": 0, "22.5": 0, "30": 0}

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = pred.detach().double()
        target = target.double()
        valid = target.norm(dim=1) > 0.5
        p = torch.nn.functional.normalize(pred, dim=1).permute(0, 2, 3, 1)[valid]
        t = torch.nn.functional.normalize(target, dim=1).permute(0, 2, 3, 1)[valid]
        cos = (p * t).sum(-1).clamp(-1.0, 1.0)
        angle = torch.rad2deg(torch.acos(cos))
        self.angle_sum += float(angle.sum())
        self.count += angle.numel()
        for key in self.within:
            self.within[key] += int((angle < float(key)).sum())
        bins = (angle * 100).long().clamp(0, self.BINS - 1)
        self.hist += torch.bincount(bins, minlength=self.BINS)

    def compute(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            nan = float("nan")
            return {"mean_angle": nan, "median_angle": nan, "within_11.25": nan, "within_22.5": nan, "within_30": nan}
        cumulative = torch.cumsum(self.hist, 0)
        median_bin = int(torch.searchsorted(cumulative, torch.tensor((n + 1) // 2)))
        out = {"mean_angle": self.angle_sum / n, "median_angle": (median_bin + 0.5) / 100}
        out.update({f"within_{k}": v / n * 100 for k, v in self.within.items()})
        return out


class ClassificationMetric:
    """Top-1 accuracy in percent."""

    def __init__(self) -> None:
        self.correct = 0
        self.count = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits.argmax(1) if logits.dim() == 2 else logits
        self.correct += int((pred == target).sum())
        self.count += target.numel()

    def compute(self) -> dict[str, float]:
        return {"top1": self.correct / self.count * 100 if self.count else float("nan")}


def delta_m(
    compact: Mapping[str, float],
    dense: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Multi-task delta in percent: mean over tasks of s_t * (M_m,t - M_b,t) / M_b,t * 100.

    `compact` and `dense` map task name -> primary metric; `higher_is_better` maps task -> direction.
    """
    tasks = list(dense)
    if not tasks:
        raise ValueError("delta_m needs at least one task")
    missing = [t for t in tasks if t not in compact or t not in higher_is_better]
    if missing:
        raise ValueError(f"delta_m: no compact metric or direction for tasks {missing}")
    total = 0.0
    for t in tasks:
        base = dense[t]
        if base == 0 or not math.isfinite(base):
            raise ValueError(f"delta_m: dense metric of task {t!r} is {base}, cannot take a relative change")
        sign = 1.0 if higher_is_better[t] else -1.0
        total += sign * (compact[t] - base) / abs(base) * 100
    return total / len(tasks)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
