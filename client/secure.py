"""The device side of secure aggregation (`[scoring] secure_aggregation`): one flat vector per device.

Under Flower's SecAgg+ the server only learns the *sum* of the devices' vectors, so what a device sends
must be summable into exactly what the plain weighted mean needs. Every device therefore lays out one
float vector over ALL tasks of the base model, in an order both sides share (`Layout`, sent by the server
in the ScoringRequest's config and checked by the device against its own model):

    [ w_t * s_t[g][c]  for t in tasks, for g in t's groups, for c in g's channels ]  +  [ C * w_t for t in tasks ]

where `s_t` are the device's per-task scores normalised to mean 1 over the task's channels (after the
optional clipping and noise of client.scoring, normalised again, exactly as the server's per-task
normalisation would treat a plain report) and `w_t` is the device's sample weight for t (samples used,
capped at the samples its profile declared, divided by the server's `weight_scale` so it lies in [0, 1]);
both are 0 for a task the device does not hold. Summed over devices this gives, per task, the weighted
sum of scores and the total weight: their ratio is the plain path's weighted mean. C is the clipping range
below: the weights then use the whole quantisation range, so the total weight, which scales every score of
its task, is exact to about 1e-9 instead of 1e-6.

The server cannot validate individual vectors any more (it never sees them), so the device validates its
own (finite, non-negative, the right groups and sizes) and refuses to send anything else. Values are at
most the task's channel count (a mean-1 non-negative vector cannot exceed it), which is the SecAgg+
clipping range the server uses: nothing is ever clipped, only quantised.

The reply is Flower's legacy FitRes layout, which `flwr.client.mod.secaggplus_mod` masks before it leaves
the device: `fitres.parameters` (the vector), `fitres.num_examples` = 1 (the real weights are inside the
vector; SecAgg+ divides by the sum of num_examples, the server multiplies back by the device count),
empty `fitres.metrics` (nothing else leaves in the clear) and an OK `fitres.status`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from client.data import LocalData
from client.device import Device
from client.scoring import TaskScores, local_scores, normalised, privatise
from cut.messages import ScoringRequest, ValidationError
from cut.models import MultiTaskModel

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


def secure_vector(device: Device, model: MultiTaskModel, data: LocalData, request: ScoringRequest, layout: Layout,
                  seed: int) -> np.ndarray:
    """What this device contributes to the secure sum (see the module docstring)."""
    if device.misbehave == "crash":
        raise RuntimeError("device crashed while scoring (misbehave=crash)")
    scores = normalised(privatise(normalised(local_scores(model, data, request, seed)), request.privacy, seed))
    used = min(request.num_batches * request.batch_size, data.num_train)
    declared = device.profile(data.num_train).samples_per_task
    # The device caps its own weight (the server, seeing only sums, cannot): samples used, at most declared.
    weights = {t: min(1.0, min(used, declared.get(t, used)) / layout.weight_scale) for t in scores}
    if device.misbehave in ("nan", "negative"):  # a buggy device: its own validation stops it
        first = next(iter(scores))
        group = next(iter(scores[first]))
        scores[first][group][0] = np.nan if device.misbehave == "nan" else -1.0
    return layout.flatten(scores, weights)


def legacy_reply(vector: np.ndarray) -> RecordDict:
    """The FitRes layout secaggplus_mod expects; it masks `fitres.parameters` before anything leaves."""
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.asarray(vector, dtype=np.float64)]),
                    num_examples=1, metrics={})
    return fitres_to_recorddict(fitres, keep_input=False)


__all__ = ["LAYOUT_FIELD", "Layout", "legacy_reply", "secure_vector"]
