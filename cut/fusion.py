"""Fusing per-task channel scores into one score per channel (CUT step 3).

Input: task -> group -> per-channel scores, where each task scored the groups that matter to it (every
shared group and its own head's groups). Output: group -> one fused score per channel, comparable across
groups, which `cut.budget` ranks globally.

Two steps, each a registry:

1. **Normalise** each task's scores so tasks, whose losses have unrelated scales, become comparable.
   Default `global`: divide each task's scores by that task's total over all the groups it scored, so
   every task distributes the same total importance; within a task, layers keep their relative
   importance (Taylor-type scores are in loss units, hence comparable across layers). Per-layer
   alternatives: `mean` (divide each task's vector in each group by its mean: every (task, layer) pair
   has mean 1; torch-pruning's default group normaliser), `sum` (by its sum) and `max` (by its max);
   `none` keeps raw scores.
2. **Fuse** a shared group's normalised task vectors (a task-specific group has one owner and keeps
   its own task's scores under every rule):
   - `max`: the channel matters if it matters to any task.
   - `mean`: average importance over the selected tasks.
   - `weighted`: priority-weighted mean (`priorities`: task -> weight >= 0; missing tasks weigh 1).
   - `union`: DiSparse's arbiter. Each task keeps its top `keep_fraction` of its own units (a global
     top-k over the groups it scores); a unit kept by any task is kept. The fused score ranks kept
     units first: kept units score 1 + s/(1+s), the others s/(1+s), with s the largest normalised task
     score, so within each set units still rank by importance. (Under the planner's default cost-aware
     ranking, kept units come first within a group; across groups cost decides as for every rule.)

CUT's default is normalise `global`, fuse `mean` (with the `fisher` criterion, `cut.methods`), chosen
by measurement with benchmarks/fusion_choice.py: pre-trained resnet18 width 0.25 on scenes (weights
540e59af619a), per-task scores from 4 train batches of 32, cost-aware planner, BN statistics
re-estimated on the scoring batches, no fine-tune, 200 test scenes. delta_m (%), mean over seeds at
params budgets 0.3 / 0.5 / 0.7 / 0.9 (taylor scores, seeds 0-2):

    seg+depth+normals   global/mean  -78.0  -25.4  -7.2  -1.10     global/max  -71.0  -27.4  -8.3  -1.35
                        global/union -84.3  -37.6 -16.1  -5.30     mean/mean  -118.7  -55.1 -17.2  -3.01
                        mean/max    -120.9  -52.7 -16.9  -3.34     mean/union -144.9  -49.9 -16.9  -3.34
    seg+normals         global/mean  -56.5  -11.8  -3.5  -0.63     global/max  -51.5  -14.0  -4.1  -0.62
                        global/union -56.3  -26.5 -14.2  -4.50     mean/mean  -101.2  -45.7 -14.5  -3.58

and, for the two finalists per criterion, seeds 0-4, budgets 0.5 / 0.7 / 0.9 (mean of the three):

    seg+depth+normals   fisher global/mean  -22.3  -5.2  -0.49 (-9.3)   fisher global/max  -21.4  -3.9  -0.44 (-8.6)
                        taylor global/mean  -22.8  -6.4  -1.03 (-10.1)  taylor global/max  -25.0  -7.5  -1.25 (-11.3)
    seg+normals         fisher global/mean  -10.7  -2.3  -0.25 (-4.4)   fisher global/max  -11.8  -1.9  -0.23 (-4.7)
                        taylor global/mean  -13.6  -3.6  -0.66 (-6.0)   taylor global/max  -15.1  -4.1  -0.46 (-6.6)

Per-layer normalisation loses 15-40 points against per-task (`global`) normalisation: it makes every
layer equally important and so over-prunes the layers all tasks depend on. `union` is the worst
per-task normalised rule (its per-task top-k ignores what channels cost). `mean` and `max` are within
noise of each other with fisher scores (std 1-3 points) and `mean` wins with taylor scores, so `mean`
(= `weighted` with equal priorities, which also serves task priorities) is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

TaskScores = dict[str, dict[str, np.ndarray]]  # task -> group -> per-channel scores
Fused = dict[str, np.ndarray]  # group -> per-channel fused scores

DEFAULT_NORMALISE = "global"
DEFAULT_RULE = "mean"


@dataclass(frozen=True)
class FusionOptions:
    priorities: Mapping[str, float] = field(default_factory=dict)  # `weighted`: task -> weight
    keep_fraction: float | None = None  # `union`: fraction of its units each task keeps


# ----------------------------------------------------------------------------------------------------
# Normalisers: one task's {group: vector} -> normalised {group: vector}

Normaliser = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _safe_divide(vec: np.ndarray, denom: float) -> np.ndarray:
    return vec / denom if denom > 0 else np.zeros_like(vec)


def _per_group(stat: Callable[[np.ndarray], float]) -> Normaliser:
    return lambda scores: {g: _safe_divide(v, float(stat(v))) for g, v in scores.items()}


def _global_sum(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    total = float(sum(v.sum() for v in scores.values()))
    return {g: _safe_divide(v, total) for g, v in scores.items()}


NORMALISERS: dict[str, Normaliser] = {
    "mean": _per_group(np.mean),
    "sum": _per_group(np.sum),
    "max": _per_group(np.max),
    "global": _global_sum,
    "none": lambda scores: dict(scores),
}


# ----------------------------------------------------------------------------------------------------
# Fusion rules: normalised task scores + options -> fused scores of every group

FusionRule = Callable[[TaskScores, FusionOptions], Fused]
RULES: dict[str, FusionRule] = {}


def register(name: str) -> Callable[[FusionRule], FusionRule]:
    def deco(fn: FusionRule) -> FusionRule:
        RULES[name] = fn
        return fn

    return deco


def owners(per_task: TaskScores) -> dict[str, list[str]]:
    """group -> the tasks that scored it (all selected tasks for a shared group, one for a head group)."""
    out: dict[str, list[str]] = {}
    for task, scores in per_task.items():
        for group in scores:
            out.setdefault(group, []).append(task)
    return out


def _elementwise(combine: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> FusionRule:
    """A rule that combines, per group, the stacked task vectors (tasks x channels) and task weights."""

    def rule(per_task: TaskScores, options: FusionOptions) -> Fused:
        fused = {}
        for group, tasks in owners(per_task).items():
            stack = np.stack([per_task[t][group].astype(np.float64) for t in tasks])
            weights = np.asarray([_priority(options, t) for t in tasks], dtype=np.float64)
            fused[group] = combine(stack, weights).astype(np.float32)
        return fused

    return rule


def _priority(options: FusionOptions, task: str) -> float:
    w = float(options.priorities.get(task, 1.0))
    if not np.isfinite(w) or w < 0:
        raise ValueError(f"task priority of {task!r} must be finite and >= 0, got {w}")
    return w


def _weighted_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = weights.sum()
    if total <= 0:
        return stack.mean(0)
    return (weights[:, None] * stack).sum(0) / total


register("max")(_elementwise(lambda stack, w: stack.max(0)))
register("mean")(_elementwise(lambda stack, w: stack.mean(0)))
register("weighted")(_elementwise(_weighted_mean))


@register("union")
def union(per_task: TaskScores, options: FusionOptions) -> Fused:
    if options.keep_fraction is None or not 0 < options.keep_fraction <= 1:
        raise ValueError(f"union fusion needs keep_fraction in (0, 1], got {options.keep_fraction}")
    kept = {task: top_fraction(scores, options.keep_fraction) for task, scores in per_task.items()}
    strongest = RULES["max"](per_task, options)
    fused = {}
    for group, tasks in owners(per_task).items():
        mask = np.zeros(len(strongest[group]), dtype=bool)
        for t in tasks:
            mask |= kept[t][group]
        s = strongest[group].astype(np.float64)
        fused[group] = (mask + s / (1.0 + s)).astype(np.float32)
    return fused


def top_fraction(scores: Mapping[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """group -> mask of the units among the global top ceil(fraction * units) (ties: first group/index)."""
    names = list(scores)
    flat = np.concatenate([np.asarray(scores[g], dtype=np.float64) for g in names]) if names else np.zeros(0)
    k = int(np.ceil(fraction * flat.size))
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for g in names:
        n = len(scores[g])
        out[g] = keep[start:start + n]
        start += n
    return out


# ----------------------------------------------------------------------------------------------------
# Public entry point


def normalise(per_task: TaskScores, method: str = DEFAULT_NORMALISE) -> TaskScores:
    if method not in NORMALISERS:
        raise ValueError(f"unknown normalisation {method!r}; known: {', '.join(sorted(NORMALISERS))}")
    return {task: NORMALISERS[method]({g: np.asarray(v, dtype=np.float64) for g, v in s.items()})
            for task, s in per_task.items()}


def fuse(
    per_task: TaskScores,
    rule: str = DEFAULT_RULE,
    normalisation: str = DEFAULT_NORMALISE,
    priorities: Mapping[str, float] | None = None,
    keep_fraction: float | None = None,
) -> Fused:
    """group -> fused per-channel scores (float32, finite, >= 0) from task -> group -> scores."""
    if rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; known: {', '.join(sorted(RULES))}")
    if not per_task:
        raise ValueError("fusion needs the scores of at least one task")
    _check_lengths(per_task)
    options = FusionOptions(priorities=dict(priorities or {}), keep_fraction=keep_fraction)
    return RULES[rule](normalise(per_task, normalisation), options)


def _check_lengths(per_task: TaskScores) -> None:
    sizes: dict[str, tuple[int, str]] = {}
    for task, scores in per_task.items():
        for group, vec in scores.items():
            n = len(vec)
            if group in sizes and sizes[group][0] != n:
                raise ValueError(f"group {group!r}: task {task!r} gives {n} scores, task {sizes[group][1]!r} "
                                 f"gives {sizes[group][0]}")
            sizes[group] = (n, task)


__all__ = [
    "DEFAULT_NORMALISE",
    "DEFAULT_RULE",
    "FusionOptions",
    "NORMALISERS",
    "RULES",
    "fuse",
    "normalise",
    "owners",
    "register",
    "top_fraction",
]
