"""Fusing per-task channel scores into one score per channel (CUT step 3).

Input: task -> group -> per-channel scores, where each task scored the groups that matter to it (every
shared group and its own head's groups). Output: group -> one fused score per channel, comparable across
groups, which `cut.budget` ranks globally.

Two steps, each a registry:

1. **Normalise** each task's scores so tasks (whose losses have unrelated scales) and layers (whose
   fan-ins differ) are comparable. Default `mean`: divide each task's vector in each group by its mean,
   so every (task, group) pair has mean 1 and a score says "this channel is x times as important as
   the average channel of this layer, for this task". It is torch-pruning's default group normaliser.
   `sum` divides by the sum instead, which makes channels of small groups look more important (mean
   1/size) and makes global ranking prune large layers first; `max` lets one outlier channel flatten a
   whole layer. `global` divides by the task's total over all its groups (DiSparse's per-task
   normalisation, no per-layer step); `none` keeps raw scores.
2. **Fuse** a shared group's normalised task vectors (a task-specific group has one owner and keeps
   its own task's scores under every rule):
   - `max`: the channel matters if it matters to any task.
   - `mean`: average importance over the selected tasks.
   - `weighted`: priority-weighted mean (`priorities`: task -> weight >= 0; missing tasks weigh 1).
   - `union`: DiSparse's arbiter. Each task keeps its top `keep_fraction` of its own units (a global
     top-k over the groups it scores); a unit kept by any task is kept. The fused score ranks kept
     units first: kept units score 1 + s/(1+s), the others s/(1+s), with s the largest normalised task
     score, so within each set units still rank by importance.

Default (CUT): normalise `mean`, fuse `mean` (`DEFAULT_NORMALISE`, `DEFAULT_RULE`). Measured on `scenes`
(pre-trained resnet18 width 0.25, seg+depth+normals, taylor scores from 4 batches of 32, no fine-tune,
3 seeds; benchmarks/fusion_choice.py, numbers in BENCHMARKS.md): see `DEFAULT_RULE_MEASUREMENT`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

TaskScores = dict[str, dict[str, np.ndarray]]  # task -> group -> per-channel scores
Fused = dict[str, np.ndarray]  # group -> per-channel fused scores

DEFAULT_NORMALISE = "mean"
DEFAULT_RULE = "mean"
DEFAULT_RULE_MEASUREMENT = "filled in by benchmarks/fusion_choice.py; see the module docstring"


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
