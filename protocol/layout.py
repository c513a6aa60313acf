"""The secure-aggregation vector layout both sides share (`[scoring] secure_aggregation`).

Under SecAgg+ the server learns only the sum of the devices' vectors, so each device lays out one float
vector over ALL tasks of the base model in an order both sides agree on: the server sends the layout in
the ScoringRequest's config (`LAYOUT_FIELD`), the device checks it against its own model and flattens its
weighted per-task scores into it, the server unflattens the unmasked sum (client.secure, server.secagg).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cut.fusion import TaskScores
from cut.messages import ValidationError

LAYOUT_FIELD = "secure_layout"  # key of the layout (JSON) in the ScoringRequest's config record


@dataclass(frozen=True)
class Layout:
    """Where each (task, group) and each task's weight sits in the flat vector (base model's task order)."""

    tasks: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]  # task -> ((group, channels), ...)
    weight_scale: float  # sample weights are divided by it (the most samples a device can use)

    @classmethod
    def of(cls, task_groups: Mapping[str, Sequence[str]], sizes: Mapping[str, int], weight_scale: float) -> Layout:
        return cls(tuple((t, tuple((g, int(sizes[g])) for g in groups)) for t, groups in task_groups.items()),
                   float(weight_scale))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.tasks)

    def channels(self, task: str) -> int:
        return sum(n for _, n in dict(self.tasks)[task])

    @property
    def size(self) -> int:
        return sum(self.channels(t) for t in self.task_names) + len(self.tasks)

    @property
    def clipping_range(self) -> float:
        """The largest value a valid vector can hold: a task's channel count (and C x a weight <= 1)."""
        return float(max([1] + [self.channels(t) for t in self.task_names]))

    def to_json(self) -> str:
        return json.dumps({"tasks": [[t, [[g, n] for g, n in groups]] for t, groups in self.tasks],
                           "weight_scale": self.weight_scale})

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            raw = json.loads(text)
            tasks = tuple((str(t), tuple((str(g), int(n)) for g, n in groups)) for t, groups in raw["tasks"])
            scale = float(raw["weight_scale"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValidationError(f"secure layout: not a valid layout ({e})") from None
        if not tasks or scale <= 0 or any(n <= 0 for _, groups in tasks for _, n in groups):
            raise ValidationError("secure layout: needs tasks, positive group sizes and a positive weight scale")
        return cls(tasks, scale)

    def flatten(self, scores: TaskScores, weights: Mapping[str, float]) -> np.ndarray:
        """One device's vector; a ValidationError if its scores do not fit the layout or are not valid."""
        unknown = set(scores) - set(self.task_names)
        if unknown:
            raise ValidationError(f"secure layout: it has no task(s) {sorted(unknown)}")
        parts, weight_block = [], []
        for task, groups in self.tasks:
            if task not in scores:
                parts.append(np.zeros(self.channels(task)))
                weight_block.append(0.0)
                continue
            mine = scores[task]
            if set(mine) != {g for g, _ in groups}:
                raise ValidationError(f"secure layout: task {task!r} has other groups than this device's model")
            w = float(weights.get(task, 0.0))
            if not 0.0 <= w <= 1.0:
                raise ValidationError(f"secure report: weight {w} of task {task!r} is not in [0, 1]")
            for group, n in groups:
                vec = np.asarray(mine[group], dtype=np.float64)
                if vec.shape != (n,):
                    raise ValidationError(f"secure layout: group {group!r} has {vec.size} channels here, "
                                          f"the layout says {n}")
                parts.append(w * vec)
            weight_block.append(w)
        flat = np.concatenate(parts + [self.clipping_range * np.asarray(weight_block)])
        if not np.isfinite(flat).all() or (flat < 0).any():
            raise ValidationError("secure report: scores must be finite and non-negative")
        return np.minimum(flat, self.clipping_range)

    def unflatten(self, vector: np.ndarray) -> tuple[TaskScores, dict[str, float]]:
        """A (summed) vector -> task -> group -> weighted score sums, and task -> total weight."""
        vector = np.asarray(vector, dtype=np.float64).reshape(-1)
        if vector.size != self.size:
            raise ValueError(f"secure sum has {vector.size} values, the layout {self.size}")
        sums: TaskScores = {}
        start = 0
        for task, groups in self.tasks:
            sums[task] = {}
            for group, n in groups:
                sums[task][group] = vector[start:start + n]
                start += n
        totals = {task: float(vector[start + i]) / self.clipping_range for i, task in enumerate(self.task_names)}
        return sums, totals


__all__ = ["LAYOUT_FIELD", "Layout"]
