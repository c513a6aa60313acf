"""Task registry: what a task is (kind, output channels, loss, metrics, which direction is better).

A *task* is a named instance of a *kind* on a dataset, e.g. `seg` = segmentation with 13 classes.
Tasks are described by a JSON-serialisable `TaskSpec`, so a model config, a plan or a device profile
can name its tasks without code. Kinds are a registry (name -> `TaskKind`): adding a kind touches
this file only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cut import metrics as M


@dataclass(frozen=True)
class TaskKind:
    """Behaviour shared by every task of one kind."""

    name: str
    dense: bool  # per-pixel output (dense head) or one vector per image (classification head)
    out_channels: Callable[[TaskSpec], int]
    loss: Callable[[torch.Tensor, torch.Tensor, TaskSpec], torch.Tensor]
    make_metric: Callable[[TaskSpec], Any]
    primary_metric: str
    higher_is_better: bool
    metric_directions: dict[str, bool] = field(default_factory=dict)  # every metric -> higher is better


def _segmentation_loss(pred: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    target = target.long()
    if (target != spec.ignore_index).sum() == 0:
        return pred.sum() * 0.0
    return F.cross_entropy(pred, target, ignore_index=spec.ignore_index)


def _depth_loss(pred: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """L1 over valid pixels (finite and > 0); a batch with none gives a zero that keeps the graph."""
    pred = pred.reshape(target.shape)
    valid = torch.isfinite(target) & (target > 0)
    if not valid.any():
        return pred.sum() * 0.0
    return (pred[valid] - target[valid]).abs().mean()


def _normals_loss(pred: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """1 - cosine similarity over pixels whose true normal has non-zero length.

    Written with sums of squares rather than `norm`/`cosine_similarity`, which are many times slower on
    CPU for N x 3 x H x W tensors; scoring runs this loss on every device.
    """
    target_sq = target.pow(2).sum(1)
    valid = target_sq > 0.25
    if not valid.any():
        return pred.sum() * 0.0
    dot = (pred * target).sum(1)
    cos = dot / (pred.pow(2).sum(1).clamp_min(1e-12).sqrt() * target_sq.clamp_min(1e-12).sqrt())
    return (1.0 - cos[valid]).mean()


def _classification_loss(pred: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    return F.cross_entropy(pred, target.long())


KINDS: dict[str, TaskKind] = {
    "segmentation": TaskKind(
        name="segmentation",
        dense=True,
        out_channels=lambda s: s.num_classes,
        loss=_segmentation_loss,
        make_metric=lambda s: M.SegmentationMetric(s.num_classes, s.ignore_index),
        primary_metric="miou",
        higher_is_better=True,
        metric_directions={"miou": True, "pixel_acc": True},
    ),
    "depth": TaskKind(
        name="depth",
        dense=True,
        out_channels=lambda s: 1,
        loss=_depth_loss,
        make_metric=lambda s: M.DepthMetric(),
        primary_metric="abs_err",
        higher_is_better=False,
        metric_directions={"abs_err": False, "rel_err": False, "delta1": True},
    ),
    "normals": TaskKind(
        name="normals",
        dense=True,
        out_channels=lambda s: 3,
        loss=_normals_loss,
        make_metric=lambda s: M.NormalsMetric(),
        primary_metric="mean_angle",
        higher_is_better=False,
        metric_directions={
            "mean_angle": False,
            "median_angle": False,
            "within_11.25": True,
            "within_22.5": True,
            "within_30": True,
        },
    ),
    "classification": TaskKind(
        name="classification",
        dense=False,
        out_channels=lambda s: s.num_classes,
        loss=_classification_loss,
        make_metric=lambda s: M.ClassificationMetric(),
        primary_metric="top1",
        higher_is_better=True,
        metric_directions={"top1": True},
    ),
}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a dataset and model: its name, kind and what the kind needs to know."""

    name: str
    kind: str
    num_classes: int = 0  # segmentation and classification only
    ignore_index: int = 255  # segmentation only
    loss_weight: float = 1.0
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; known: {sorted(KINDS)}")
        if self.kind in ("segmentation", "classification") and self.num_classes < 2:
            raise ValueError(f"task {self.name!r}: a {self.kind} task needs num_classes >= 2")
        if not self.name.isidentifier():
            raise ValueError(f"task name {self.name!r} must be a Python identifier")

    @property
    def task_kind(self) -> TaskKind:
        return KINDS[self.kind]

    @property
    def out_channels(self) -> int:
        return self.task_kind.out_channels(self)

    @property
    def higher_is_better(self) -> bool:
        return self.task_kind.higher_is_better

    @property
    def primary_metric(self) -> str:
        return self.task_kind.primary_metric

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.task_kind.loss(pred, target, self)

    def make_metric(self):
        return self.task_kind.make_metric(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"task spec has unknown keys {sorted(unknown)}")
        d = dict(d)
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)


def parse_task_list(text: str | list[str], available: list[TaskSpec]) -> list[str]:
    """Parse 'seg,depth' into task names, checking each against the available tasks (order kept)."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    known = [t.name for t in available]
    if not names:
        raise ValueError(f"no tasks given; available: {','.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {','.join(unknown)}; available: {','.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"task list {','.join(names)} names a task twice")
    return names
