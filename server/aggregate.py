"""Aggregating importance reports across devices, per task, and personalising them per device.

Each device scored only its own tasks, so task t's aggregate uses exactly the devices that hold t. Every
(device, task, group) vector is first divided by its mean (devices already do this; the server repeats
it, so a device that did not cannot outweigh the others by scale), then combined:

- `weighted-mean` (default): weighted by the samples the device used for t, capped at the samples it
  declared in its profile (a device cannot buy influence by claiming more);
- `median`: coordinate-wise median, unweighted: robust to a minority of outlying or poisoned reports;
- `trimmed-mean`: coordinate-wise, unweighted: at every channel the `trim_fraction` largest and smallest
  values (floor(trim_fraction * n) devices at each end) are dropped and the rest averaged. Robust like the
  median when fewer than trim_fraction of the devices are hostile, and less noisy than the median.

Server clipping (`server_clip` > 0, any rule): before combining, each device's normalised vector of each
(task, group) is scaled down to L2 norm at most server_clip x the median of that (task, group)'s norms
over the devices. Normalisation fixes how much importance a report holds in total; clipping bounds how
much of it one report can pile onto a few channels of one layer (a crafted report that puts all its
mass on channels it wants kept has a far larger norm than an honest one). See BENCHMARKS.md
("Robust aggregation") for the measured effect against crafted reports. Robust rules and clipping need
the individual reports: under secure aggregation the server holds only sums, so neither applies there.

Personalisation (`planning.personalisation`, alpha in [0, 1]): a device's plan is made from
`(1 - alpha) * aggregate_t + alpha * own_t` for each of its tasks. alpha = 0 (default) uses the fleet's
knowledge only, so devices with the same tasks and budget share one plan and one compact model; alpha = 1
uses only the device's own scores (a local CUT, no federation benefit); in between trades the statistical
strength of the fleet against the device's own data distribution (non-IID room types). Any alpha > 0
makes plans device-specific, so the server builds one compact model per device instead of per
(task subset, budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cut import fusion
from cut.fusion import TaskScores

Contribution = tuple[TaskScores, Mapping[str, float]]  # one device's scores and its weight per task


def normalised(scores: TaskScores) -> TaskScores:
    """Each task's scores as shares of the task's total (cut.fusion's `global`): devices become comparable
    whatever scale their scores came in (the device itself sends them with mean 1, client.scoring.mean_one)."""
    return fusion.normalise(scores, "global")


def _weighted_mean(vectors: list[np.ndarray], weights: list[float], trim_fraction: float) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    stack = np.stack(vectors)
    if w.sum() <= 0:
        return stack.mean(0)
    return (w[:, None] * stack).sum(0) / w.sum()


def _median(vectors: list[np.ndarray], weights: list[float], trim_fraction: float) -> np.ndarray:
    return np.median(np.stack(vectors), axis=0)


def trimmed_mean(vectors: list[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping floor(trim_fraction * n) values at each end (unweighted).

    With too few devices to drop any (n * trim_fraction < 1) it is the plain mean; it never drops all.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    stack = np.sort(np.stack(vectors).astype(np.float64), axis=0)
    n = stack.shape[0]
    k = min(int(np.floor(trim_fraction * n + 1e-9)), (n - 1) // 2)
    return stack[k:n - k].mean(0)


# rule -> combine(vectors, weights, trim_fraction); weights only matter to the weighted mean
AGGREGATORS: dict[str, Callable[[list[np.ndarray], list[float], float], np.ndarray]] = {
    "weighted-mean": _weighted_mean,
    "median": _median,
    "trimmed-mean": lambda vectors, weights, trim_fraction: trimmed_mean(vectors, trim_fraction),
}


def clip_to_median(vectors: list[np.ndarray], factor: float) -> list[np.ndarray]:
    """Each vector scaled down to L2 norm <= factor x the median norm of `vectors` (factor <= 0: as is)."""
    if factor <= 0 or not vectors:
        return vectors
    norms = np.array([float(np.linalg.norm(v)) for v in vectors])
    bound = factor * float(np.median(norms))
    return [v * (bound / n) if n > bound else v for v, n in zip(vectors, norms, strict=True)]


def aggregate(contributions: Sequence[Contribution], rule: str = "weighted-mean", *, trim_fraction: float = 0.1,
              server_clip: float = 0.0) -> TaskScores:
    """task -> group -> aggregated scores over the devices that scored the task.

    `trim_fraction` is the share dropped at each end by `trimmed-mean`; `server_clip` > 0 clips every
    device's (task, group) vector to server_clip x the median norm of that (task, group) first.
    """
    if rule not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {rule!r}; known: {', '.join(AGGREGATORS)}")
    if server_clip < 0 or not np.isfinite(server_clip):
        raise ValueError(f"server_clip must be a finite number >= 0, got {server_clip}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    combine = AGGREGATORS[rule]
    collected: dict[str, dict[str, tuple[list[np.ndarray], list[float]]]] = {}
    for scores, weights in contributions:
        for task, groups in normalised(scores).items():
            for group, vec in groups.items():
                vectors, ws = collected.setdefault(task, {}).setdefault(group, ([], []))
                vectors.append(vec)
                ws.append(float(weights.get(task, 0.0)))
    return {task: {g: combine(clip_to_median(v, server_clip), w, trim_fraction).astype(np.float32)
                   for g, (v, w) in groups.items()}
            for task, groups in collected.items()}


def personalise(aggregated: TaskScores, own: TaskScores | None, tasks: Sequence[str], alpha: float) -> TaskScores:
    """The per-task scores a device's plan is made from: aggregate and own scores blended by alpha."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"personalisation alpha must be in [0, 1], got {alpha}")
    missing = [t for t in tasks if t not in aggregated]
    if missing:
        raise ValueError(f"no aggregated scores for task(s) {missing}")
    if alpha == 0.0 or own is None:
        return {t: aggregated[t] for t in tasks}
    mine = normalised({t: own[t] for t in tasks})
    return {t: {g: ((1 - alpha) * aggregated[t][g] + alpha * mine[t][g]).astype(np.float32) for g in aggregated[t]}
            for t in tasks}


def fedavg(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Sample-weighted average of weight arrays with identical names and shapes (one plan's devices).

    Floating arrays (weights, BN statistics) are averaged; integer ones (BN's num_batches_tracked) take
    the largest value, which is what continued training would have counted.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(n for _, n in updates))
    first = updates[0][0]
    out: dict[str, np.ndarray] = {}
    for name, ref in first.items():
        if np.issubdtype(ref.dtype, np.floating):
            acc = np.zeros(ref.shape, dtype=np.float64)
            for arrays, n in updates:
                acc += (n / total if total > 0 else 1.0 / len(updates)) * arrays[name].astype(np.float64)
            out[name] = acc.astype(ref.dtype)
        else:
            out[name] = np.max(np.stack([arrays[name] for arrays, _ in updates]), axis=0).astype(ref.dtype)
    return out


MAX_UPDATE_RATIO = 0.5  # a fine-tuning round moves a plan's weights by less than half their norm


def check_update(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 max_ratio: float = MAX_UPDATE_RATIO) -> str:
    """Why a fine-tuned update cannot be averaged into its plan's weights ('' if it can): other arrays,
    shapes or dtypes, NaN or inf, or a change of the float weights larger than `max_ratio` of their norm
    (a few local distillation steps cannot do that; a device scaling its weights to overwrite the average
    would)."""
    if set(arrays) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
        return f"update names other arrays (missing {missing[:3]}, extra {extra[:3]})"
    for name, ref in reference.items():
        got = arrays[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            return f"update array {name!r} is {got.dtype}{list(got.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            return f"update array {name!r} holds NaN or inf"
    floats = [n for n, ref in reference.items() if np.issubdtype(ref.dtype, np.floating) and "running_" not in n]
    norm = math.sqrt(sum(float(np.sum(np.square(reference[n], dtype=np.float64))) for n in floats))
    change = math.sqrt(sum(float(np.sum(np.square(arrays[n].astype(np.float64) - reference[n]))) for n in floats))
    if norm > 0 and change > max_ratio * norm:
        return f"update moves the weights by {change / norm:.3g} of their norm (at most {max_ratio:g})"
    return ""


__all__ = ["AGGREGATORS", "aggregate", "check_update", "clip_to_median", "fedavg", "normalised",
           "personalise", "trimmed_mean"]
