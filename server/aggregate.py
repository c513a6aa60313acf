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

Fine-tune updates (`fedavg` over the devices of one plan) are first checked against the weights the round
started from: `check_update` refuses one that moves them by more than half their norm, and `bound_updates`
excludes an outlying delta of a group of 3 or more and clips the rest to `[finetune] clip_multiple` x the
group's median delta norm; each update's weight is capped by the server (steps x batch size) and at the
group's lower median (`median_capped`).
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


def is_statistic(name: str) -> bool:
    """BatchNorm's running mean and variance: measured on data, not learnt; each layer on its own scale."""
    return "running_" in name


def _delta_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], names: Sequence[str]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(arrays[n].astype(np.float64) - reference[n]))) for n in names))


def _scaled(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], names: Sequence[str],
            factor: float, out: dict[str, np.ndarray]) -> None:
    """out[n] = reference + factor x (arrays - reference) for `names` (factor < 1: a clipped delta)."""
    for n in names:
        delta = arrays[n].astype(np.float64) - reference[n]
        out[n] = (reference[n] + factor * delta).astype(reference[n].dtype)


def bound_updates(updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray],
                  clip_multiple: float) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, str]]:
    """One plan's fine-tuned updates, checked against the weights the round started from (`reference`).

    Returns (index -> the update to average, bounded; index -> why it is excluded). Every update must have
    passed `check_update` against the same reference. What each kind of array is allowed:

    - learnt float arrays (weights, biases, BN affine): the delta's L2 norm over all of them is compared with
      the group's median delta norm m (the lower median: for an even group the smaller middle value, so a
      pair is bounded by its smaller delta; the mean of the two middle values could never clip a pair
      for clip_multiple >= 2). In a group of 3 or more, an update whose norm exceeds clip_multiple x m is
      excluded: devices of one plan start from the same weights and run the same steps at the same lr,
      so honest delta norms agree closely (benchmarks/bench_attack.py measures the spread), and one
      beyond the bound is an outlier, not data; a majority of honest devices fixes m. The direction is
      not tested (honest deltas differ in direction with their non-IID data; a delta of honest size in a
      hostile direction weighs what one honest step does and is left to the teacher gate). Deltas that
      remain, and both of a pair, which no rule can tell apart, are clipped to clip_multiple x m;
    - BN running statistics: each array's delta clipped to clip_multiple x the group's median delta norm
      of that array, never a reason to exclude (devices with other data legitimately move them more);
    - integer arrays (BN num_batches_tracked): the group's lower median, never below the reference
      (a count cannot go back; a minority cannot set it).
    """
    if not clip_multiple >= 1.0 or not math.isfinite(clip_multiple):
        raise ValueError(f"clip_multiple must be a finite number >= 1, got {clip_multiple}")
    if not updates:
        return {}, {}
    learnt = [n for n, r in reference.items() if np.issubdtype(r.dtype, np.floating) and not is_statistic(n)]
    stats = [n for n, r in reference.items() if np.issubdtype(r.dtype, np.floating) and is_statistic(n)]
    counts = [n for n, r in reference.items() if not np.issubdtype(r.dtype, np.floating)]
    norms = [_delta_norm(u, reference, learnt) for u in updates]
    median = float(np.sort(norms)[(len(norms) - 1) // 2])
    bound = clip_multiple * median
    refused: dict[int, str] = {}
    if len(updates) >= 3:
        for i, norm in enumerate(norms):
            if norm > bound:
                times = f"{norm / median:.3g} x" if median > 0 else "more than"
                refused[i] = (f"its delta norm {norm:.3g} is {times} the median delta norm {median:.3g} of the "
                              f"{len(updates)} devices of its plan (at most clip_multiple {clip_multiple:g} x)")
    kept = [i for i in range(len(updates)) if i not in refused]
    stat_bounds = {n: clip_multiple * float(np.sort([_delta_norm(updates[i], reference, [n]) for i in kept])
                                            [(len(kept) - 1) // 2]) for n in stats}
    count_values = {n: np.asarray(np.maximum(reference[n], np.sort(np.stack([updates[i][n] for i in kept]), axis=0)
                                             [(len(kept) - 1) // 2]), dtype=reference[n].dtype) for n in counts}
    out: dict[int, dict[str, np.ndarray]] = {}
    for i in kept:
        update = updates[i]
        bounded = dict(update)
        if norms[i] > bound:
            _scaled(update, reference, learnt, bound / norms[i], bounded)
        for n in stats:
            norm = _delta_norm(update, reference, [n])
            if norm > stat_bounds[n]:
                _scaled(update, reference, [n], stat_bounds[n] / norm, bounded)
        bounded.update(count_values)
        out[i] = bounded
    return out, refused


def median_capped(weights: Sequence[float]) -> list[float]:
    """Each weight capped at the group's lower median. A fine-tune update's example count is the device's
    own claim; the server's cap (steps x batch size) is above what an honest device with less data reports,
    so a device claiming 2^62 would still weigh several honest ones. Capped at the median of its group, a
    minority cannot raise its share above an honest device's (in a pair, both weigh the smaller claim)."""
    if not weights:
        return []
    cap = float(np.sort(np.asarray(weights, dtype=np.float64))[(len(weights) - 1) // 2])
    return [min(float(w), cap) for w in weights]


__all__ = ["AGGREGATORS", "aggregate", "bound_updates", "check_update", "clip_to_median", "fedavg", "is_statistic",
           "median_capped", "normalised", "personalise", "trimmed_mean"]
