"""From fused channel scores and a budget to a PruningPlan (CUT step 4, without touching a model).

A budget is a fraction of the *decomposed* model (its parameters, its MACs, its memory for batch-1
inference: `cut.memory`, or its latency measured on the device: `cut.latency`, passed as
`BudgetOptions.latency`) that may remain. Channels
are ranked globally by their fused score divided by what one channel of their group costs (`cost_aware`,
the default: the parameters or MACs that removing one channel from the dense model saves), so the
budget buys the most importance per parameter; `cost_aware=False` ranks by score alone. Measured on
scenes (benchmarks/fusion_choice.py, no fine-tune), cost-aware ranking improved delta_m of every
scoring/fusion variant, e.g. at a 0.8 params budget from -38 to -8 (per-layer normalised scores) and
from -5.5 to -2.8 (per-task normalised scores): plain ranking strips cheap early layers whose few
channels every task needs. Each group keeps at least `min_keep(size)` channels (default: 8 or 25% of the group,
whichever is smaller) and a kept count that is a multiple of `round_to` (or the whole group), because
odd channel counts run slowly on real kernels.

Search: binary search on a score threshold (every group keeps its channels scoring at or above it,
rounded up to an allowed count) for the most channels whose cost is within budget, then a greedy fill
that adds the next-best allowed step of any group while the budget still holds. Costs come from the
analytic cost model of `cut.groups`, so a plan for any budget takes milliseconds. The reached fraction is
never above the budget and, where the granularity allows, within 1 percentage point below it.

A latency budget plans against the device's measured table (`cut.latency.LatencyCost`) with the
table's measured channel multiple as `round_to`, and leaves whole the groups whose pruning saves no
measurable time there (`cut.latency.no_saving_groups`): channels that cost nothing are not traded.

A memory budget plans against `cut.memory.MemoryCost` (weight bytes + peak activation bytes, computed from
the model alone). Its peak is a max over layers, not additive over channels: the searches above only ever
evaluate whole kept-count vectors against it, exactly, and memory only grows with kept channels, so they
hold as they are; the per-channel cost used for ranking comes from the cost model's additive stand-in
(`rank_cost`: weight bytes + the sum of every layer's activation bytes).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cut.groups import CostModel, GroupAnalysis
from cut.memory import MEMORY, memory_cost
from cut.plan import PruningPlan

ANALYTIC_KINDS = ("params", "macs", MEMORY)  # plannable from the model alone
LATENCY = "latency"  # needs a latency table measured on the device (BudgetOptions.latency)
BUDGET_KINDS = ALL_BUDGET_KINDS = (*ANALYTIC_KINDS, LATENCY)


@dataclass(frozen=True)
class BudgetOptions:
    min_channels: int = 8  # a group keeps at least min(min_channels, ceil(min_fraction * size)) channels
    min_fraction: float = 0.25
    round_to: int = 8  # kept counts are multiples of round_to (or the whole group)
    cost_aware: bool = True  # rank channels by score / (what one channel of its group costs)
    latency: Any = None  # cut.latency.LatencyTable: needed by (and only used for) a latency budget
    keep_whole: frozenset[str] = frozenset()  # groups never pruned (a latency budget adds its no-saving ones)


def check_budget(kind: str, value: float) -> None:
    """ValueError naming the problem if the budget is not (params|macs|memory|latency, a fraction in (0, 1])."""
    if kind not in ALL_BUDGET_KINDS:
        raise ValueError(f"budget kind {kind!r} is not supported here; use one of {', '.join(ALL_BUDGET_KINDS)}")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"budget value {value!r} must be a fraction in (0, 1] of the decomposed model")


def min_keep(size: int, options: BudgetOptions) -> int:
    return max(1, min(options.min_channels, math.ceil(options.min_fraction * size), size))


def allowed_counts(size: int, options: BudgetOptions) -> np.ndarray:
    """Kept counts a group of `size` channels may have: multiples of round_to >= min_keep, and size."""
    step = max(1, int(options.round_to))
    low = min_keep(size, options)
    counts = {c for c in range(step, size + 1, step) if c >= low}
    counts.add(size)
    return np.asarray(sorted(counts), dtype=np.int64)


def cost_for(analysis: GroupAnalysis, kind: str, options: BudgetOptions) -> tuple[Any, BudgetOptions]:
    """(cost model, options) for planning `kind`: the analytic model, for memory `cut.memory.MemoryCost`, or
    for latency the device's table with its measured channel multiple and its no-saving groups kept whole."""
    if kind == MEMORY:
        return memory_cost(analysis), options
    if kind != LATENCY:
        return analysis.cost, options
    if options.latency is None:
        raise ValueError("a latency budget needs a latency table measured on the device "
                         "(cut.latency.table_for; BudgetOptions(latency=...))")
    from cut.latency import latency_cost, no_saving_groups

    cost = latency_cost(analysis, options.latency)
    options = replace(options, round_to=int(options.latency.round_to))
    lowest = {g.name: int(allowed_counts(g.size, options)[0]) for g in analysis.groups}
    whole = no_saving_groups(cost, lowest)
    return cost, replace(options, keep_whole=frozenset(options.keep_whole) | whole)


def group_allowed(cost, options: BudgetOptions) -> dict[str, np.ndarray]:
    """Allowed kept counts per group (a group in options.keep_whole may only stay whole)."""
    out = {}
    for i, g in enumerate(cost.group_names):
        size = int(cost.group_sizes[i])
        out[g] = np.asarray([size], dtype=np.int64) if g in options.keep_whole else allowed_counts(size, options)
    return out


def achieved_of(cost, kind: str, kept: np.ndarray) -> dict[str, float]:
    """What a plan reaches: params / MACs (ratios and counts), for memory its bytes (total and peak
    activations) and ratio, and for latency the predicted ms and ratio."""
    params, macs = cost.evaluate(kept)
    out = {
        "params_ratio": params / cost.dense_params,
        "macs_ratio": macs / cost.dense_macs if cost.dense_macs else 1.0,
        "params": float(params),
        "macs": float(macs),
    }
    if kind == MEMORY:
        out["memory_bytes"] = float(cost.cost(kind, kept))
        out["memory_ratio"] = cost.cost(kind, kept) / cost.dense(kind)
        out["activation_bytes"] = float(cost.peak_bytes(kept))
    if kind == LATENCY:
        out["latency_ms_predicted"] = cost.cost(kind, kept) / 1e6
        out["latency_ratio_predicted"] = cost.cost(kind, kept) / cost.dense(kind)
    return out


def make_plan(
    fused: Mapping[str, np.ndarray],
    analysis: GroupAnalysis,
    budget_kind: str,
    budget_value: float,
    options: BudgetOptions | None = None,
    base_model_sha256: str = "",
    tasks: tuple[str, ...] | list[str] | None = None,
    method: str = "cut",
) -> PruningPlan:
    """The plan that keeps the best channels while params/MACs/memory/latency stay within `budget_value` of
    dense."""
    check_budget(budget_kind, budget_value)
    cost, options = cost_for(analysis, budget_kind, options or BudgetOptions())
    names = list(cost.group_names)
    missing = [g for g in names if g not in fused]
    if missing:
        raise ValueError(f"no fused scores for channel groups {missing}")
    order = {g: np.argsort(-np.asarray(fused[g], dtype=np.float64), kind="stable") for g in names}
    scale = channel_costs(cost, budget_kind) if options.cost_aware else np.ones(len(names))
    ranked = {g: np.asarray(fused[g], dtype=np.float64)[order[g]] / scale[j] for j, g in enumerate(names)}
    allowed = group_allowed(cost, options)
    target = budget_value * cost.dense(budget_kind)
    kept = _threshold_search(names, ranked, allowed, cost, budget_kind, target)
    kept = _greedy_fill(names, ranked, allowed, cost, budget_kind, target, kept)
    keep = {g: tuple(sorted(int(i) for i in order[g][: int(kept[j])])) for j, g in enumerate(names)}
    achieved = achieved_of(cost, budget_kind, kept)
    return PruningPlan(
        base_model_sha256=base_model_sha256,
        tasks=tuple(tasks if tasks is not None else analysis.task_names),
        keep=keep,
        group_sizes={g: int(cost.group_sizes[j]) for j, g in enumerate(names)},
        budget_kind=budget_kind,
        budget_value=float(budget_value),
        method=method,
        achieved=achieved,
    )


def channel_costs(cost: CostModel, kind: str) -> np.ndarray:  # latency: ns, so the floor of 1 is tiny
    """Per group: what removing one channel from the dense model saves (params, MACs, ...), at least 1.

    A cost model whose budget figure is not additive over channels (memory: a max over layers) ranks by
    the additive figure it offers as `rank_cost`.
    """
    figure = getattr(cost, "rank_cost", cost.cost)
    dense = figure(kind, cost.group_sizes)
    out = np.empty(len(cost.group_names))
    for j in range(len(out)):
        kept = cost.group_sizes.copy()
        kept[j] -= 1
        out[j] = max(1.0, dense - figure(kind, kept))
    return out


def _counts_at(names, ranked, allowed, tau: float) -> np.ndarray:
    """Kept channels per group at threshold tau: those scoring >= tau, rounded up to an allowed count."""
    out = np.empty(len(names), dtype=np.float64)
    for j, g in enumerate(names):
        raw = int(np.searchsorted(-ranked[g], -tau, side="right"))  # count of scores >= tau
        out[j] = allowed[g][min(int(np.searchsorted(allowed[g], raw)), len(allowed[g]) - 1)]
    return out


def _threshold_search(names, ranked, allowed, cost: CostModel, kind: str, target: float) -> np.ndarray:
    smallest = np.asarray([allowed[g][0] for g in names], dtype=np.float64)
    if cost.cost(kind, smallest) > target:
        reachable = cost.cost(kind, smallest) / cost.dense(kind)
        raise ValueError(
            f"budget {target / cost.dense(kind):.4f} of {kind} is unreachable: keeping the minimum channels "
            f"of every group already needs {reachable:.4f}"
        )
    taus = np.unique(np.concatenate([ranked[g] for g in names]))  # ascending
    lo, hi = 0, len(taus)  # answer index in [lo, hi]; hi means "keep only the minimum"
    while lo < hi:
        mid = (lo + hi) // 2
        if cost.cost(kind, _counts_at(names, ranked, allowed, taus[mid])) <= target:
            hi = mid
        else:
            lo = mid + 1
    return smallest if lo == len(taus) else _counts_at(names, ranked, allowed, taus[lo])


def _greedy_fill(names, ranked, allowed, cost: CostModel, kind: str, target: float, kept: np.ndarray) -> np.ndarray:
    """Add the next allowed step of the group whose next channel scores best, while the budget holds.

    Costs only grow with kept channels, so a step that does not fit now never will: it is dropped.
    """
    kept = kept.copy()
    heap = []

    def push(j: int) -> None:
        g = names[j]
        nxt = np.searchsorted(allowed[g], kept[j], side="right")
        if nxt < len(allowed[g]):
            heapq.heappush(heap, (-float(ranked[g][int(kept[j])]), j, int(allowed[g][nxt])))

    for j in range(len(names)):
        push(j)
    while heap:
        _, j, count = heapq.heappop(heap)
        trial = kept.copy()
        trial[j] = count
        if cost.cost(kind, trial) <= target:
            kept = trial
            push(j)
    return kept


def uniform_keep_fraction(analysis: GroupAnalysis, budget_kind: str, budget_value: float,
                          options: BudgetOptions | None = None) -> float:
    """The channel fraction r at which keeping r of every group meets the budget (continuous counts).

    Used as the per-task keep fraction of DiSparse's union arbiter, whose top-k counts units, not cost.
    """
    check_budget(budget_kind, budget_value)
    cost, _ = cost_for(analysis, budget_kind, options or BudgetOptions())
    target = budget_value * cost.dense(budget_kind)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost.cost(budget_kind, cost.group_sizes * mid) <= target:
            lo = mid
        else:
            hi = mid
    return max(lo, 1e-3)


__all__ = [
    "ALL_BUDGET_KINDS",
    "ANALYTIC_KINDS",
    "BUDGET_KINDS",
    "LATENCY",
    "MEMORY",
    "BudgetOptions",
    "achieved_of",
    "allowed_counts",
    "check_budget",
    "cost_for",
    "group_allowed",
    "make_plan",
    "min_keep",
    "uniform_keep_fraction",
]
