"""The secure-aggregation vector layout both sides share (`[scoring] secure_aggregation`).

Under SecAgg+ the server learns only the sum of the devices' vectors, so each device lays out one float
vector over ALL tasks of the base model in an order both sides agree on: the server sends the layout in
the ScoringRequest's config (`LAYOUT_FIELD`), the device checks it against its own model and flattens its
weighted per-task scores into it, the server unflattens the unmasked sum (client.secure, server.secagg).

Distributed differential privacy (`[scoring] privacy = "distributed"`): the layout also carries `dp`
(`DistributedNoise`), the recipe every device follows before masking. Per task t with N_t channels the
device releases u_t = T(s_t) / sqrt(N_t), T the score transform (`TRANSFORMS`: s^p elementwise) of its
mean-1 scores s_t, clipped to L2 norm `clip`; then it adds N(0, share_std^2) to every score coordinate
of its vector (the sample-weight block is public metadata and carries none). For the transforms with
p <= 1/2 the norm before clipping is at most 1 (sum of s^(2p) <= N for a mean-1 non-negative vector, by
Jensen), so the default clip 1 never changes a vector: the bound is data-independent. The transform and
its inverse live here because both sides must agree on them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cut.fusion import TaskScores
from cut.messages import ValidationError

LAYOUT_FIELD = "secure_layout"  # key of the layout (JSON) in the ScoringRequest's config record
TRANSFORMS = {"none": 1.0, "sqrt": 0.5, "fourth-root": 0.25}  # score transform -> power p (T(s) = s^p)
NOISE_TAIL = 10.0  # quantisation range = clip + NOISE_TAIL x share std: P(|noise| > 10 std) ~ 1.5e-23


@dataclass(frozen=True)
class DistributedNoise:
    """What each device does to its vector under distributed DP (module docstring); set by the server."""

    transform: str  # a key of TRANSFORMS
    clip: float  # L2 clip of each task's u_t (1 = the largest possible norm for sqrt / fourth-root)
    share_std: float  # std of the Gaussian noise each device adds per score coordinate
    min_devices: int  # the fewest devices whose shares are in a release (the noise is calibrated for it)

    def check(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValidationError(f"secure layout: unknown score transform {self.transform!r} "
                                  f"(one of {', '.join(TRANSFORMS)})")
        for name in ("clip", "share_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValidationError(f"secure layout: dp {name} must be a finite number > 0, got {value!r}")
        if self.min_devices < 2:
            raise ValidationError(f"secure layout: dp min_devices must be >= 2, got {self.min_devices}")

    @property
    def power(self) -> float:
        return TRANSFORMS[self.transform]

    def encode(self, scores: Mapping[str, Mapping[str, np.ndarray]], channels: Mapping[str, int]
               ) -> dict[str, dict[str, np.ndarray]]:
        """Mean-1 scores -> u_t = clip_L2(s^p / sqrt(N_t), clip) per task (non-negative, norm <= clip)."""
        out = {}
        for task, groups in scores.items():
            names = list(groups)
            flat = np.concatenate([np.maximum(np.asarray(groups[g], dtype=np.float64), 0.0) for g in names])
            flat = flat ** self.power / math.sqrt(channels[task])
            norm = float(np.linalg.norm(flat))
            if norm > self.clip:
                flat *= self.clip / norm
            out[task], start = {}, 0
            for g in names:
                n = len(groups[g])
                out[task][g] = flat[start:start + n]
                start += n
        return out

    def decode(self, estimate: np.ndarray, channels: int) -> np.ndarray:
        """The server's inverse of `encode` on a (denoised) estimate of the mean u_t: clamp at 0, undo the
        scale and the power; sums to 1 over the task (like a plain per-task normalised mean)."""
        values = (np.maximum(np.asarray(estimate, dtype=np.float64), 0.0) * math.sqrt(channels)) ** (1.0 / self.power)
        total = float(values.sum())
        return values / total if total > 0 else np.full_like(values, 1.0 / max(values.size, 1))


@dataclass(frozen=True)
class Layout:
    """Where each (task, group) and each task's weight sits in the flat vector (base model's task order)."""

    tasks: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]  # task -> ((group, channels), ...)
    weight_scale: float  # sample weights are divided by it (the most samples a device can use)
    dp: DistributedNoise | None = None  # distributed DP: what each device adds before masking

    @classmethod
    def of(cls, task_groups: Mapping[str, Sequence[str]], sizes: Mapping[str, int], weight_scale: float,
           dp: DistributedNoise | None = None) -> Layout:
        return cls(tuple((t, tuple((g, int(sizes[g])) for g in groups)) for t, groups in task_groups.items()),
                   float(weight_scale), dp)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.tasks)

    def channels(self, task: str) -> int:
        return sum(n for _, n in dict(self.tasks)[task])

    @property
    def size(self) -> int:
        return sum(self.channels(t) for t in self.task_names) + len(self.tasks)

    @property
    def score_size(self) -> int:
        """How many leading coordinates hold scores (the rest: one weight per task)."""
        return self.size - len(self.tasks)

    @property
    def clipping_range(self) -> float:
        """The largest value a valid vector can hold: a task's channel count (and C x a weight <= 1); under
        distributed DP the clip plus NOISE_TAIL noise stds (the quantiser then clips with probability
        ~1e-23 per coordinate, counted in delta)."""
        if self.dp is not None:
            return float(max(1.0, self.dp.clip + NOISE_TAIL * self.dp.share_std))
        return float(max([1] + [self.channels(t) for t in self.task_names]))

    def to_json(self) -> str:
        raw: dict = {"tasks": [[t, [[g, n] for g, n in groups]] for t, groups in self.tasks],
                     "weight_scale": self.weight_scale}
        if self.dp is not None:
            raw["dp"] = {"transform": self.dp.transform, "clip": self.dp.clip, "share_std": self.dp.share_std,
                         "min_devices": self.dp.min_devices}
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            raw = json.loads(text)
            tasks = tuple((str(t), tuple((str(g), int(n)) for g, n in groups)) for t, groups in raw["tasks"])
            scale = float(raw["weight_scale"])
            dp = None if raw.get("dp") is None else DistributedNoise(
                str(raw["dp"]["transform"]), float(raw["dp"]["clip"]), float(raw["dp"]["share_std"]),
                int(raw["dp"]["min_devices"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValidationError(f"secure layout: not a valid layout ({e})") from None
        if not tasks or scale <= 0 or any(n <= 0 for _, groups in tasks for _, n in groups):
            raise ValidationError("secure layout: needs tasks, positive group sizes and a positive weight scale")
        if dp is not None:
            dp.check()
        return cls(tasks, scale, dp)

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


__all__ = ["LAYOUT_FIELD", "NOISE_TAIL", "TRANSFORMS", "DistributedNoise", "Layout"]
