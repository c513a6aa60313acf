"""From channel scores to a PruningPlan: the one place every route (CLI, bench, server) plans with.

- `plan_from_scores`: CUT's planning, per-task scores -> normalise -> fuse -> budget planner. The server
  (`server/planning.py:PlanBook.plan`), `cutfl prune` and `cutfl bench` all call it;
  with the server's arguments (rule `weighted`, normalise `global`, the device's priorities, method
  `cut`) it gives the server's plan bit for bit (tests/test_budget.py).
- `uniform_plan`: the textbook allocation of the `random` and `l1` baselines: the same kept fraction in
  every prunable group, the fraction found so the whole model meets the budget, channels chosen by their
  score within each group.
- `union_plan`: DiSparse's arbiter made structured: each task keeps its top fraction q of the channels
  it scores (one top-k over all its groups), a channel kept by any task is kept, q the largest fraction
  whose union meets the budget.

All three round kept counts to the same allowed counts (`cut.budget.allowed_counts`: multiples of
`round_to` and at least `min_keep`), so every method gets the same granularity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cut import fusion
from cut.budget import BudgetOptions, achieved_of, check_budget, cost_for, group_allowed, make_plan
from cut.groups import GroupAnalysis
from cut.importance import Batch
from cut.memory import MEMORY, memory_cost
from cut.models import MultiTaskModel
from cut.plan import PruningPlan

DEFAULT_RULE = "weighted"  # the server's rule; equal to `mean` bit for bit when no priorities are given
DEFAULT_NORMALISE = fusion.DEFAULT_NORMALISE
ALLOCATIONS = ("global", "uniform")


@dataclass(frozen=True)
class PlanRequest:
    """What every method is asked: prune `model` (decomposed) for `tasks` to the budget."""

    model: MultiTaskModel
    batches: list[Batch]
    tasks: tuple[str, ...]
    budget_kind: str
    budget_value: float
    options: BudgetOptions = BudgetOptions()
    seed: int = 0
    base_model_sha256: str = ""
    priorities: Mapping[str, float] = field(default_factory=dict)


@dataclass
class PlanResult:
    plan: PruningPlan
    seconds: dict[str, float]  # scoring, fusion, planning
    info: dict = field(default_factory=dict)


def plan_from_scores(
    per_task: Mapping[str, Mapping[str, np.ndarray]],
    analysis: GroupAnalysis,
    budget_kind: str,
    budget_value: float,
    *,
    options: BudgetOptions | None = None,
    priorities: Mapping[str, float] | None = None,
    normalise: str = DEFAULT_NORMALISE,
    rule: str = DEFAULT_RULE,
    keep_fraction: float | None = None,
    allocation: str = "global",
    base_model_sha256: str = "",
    tasks: Sequence[str] | None = None,
    method: str = "cut",
) -> PruningPlan:
    """task -> group -> per-channel scores to the plan that meets the budget (CUT steps 3-4).

    Each task's scores are normalised (`normalise`, see `cut.fusion`), shared groups fused (`rule`,
    with `priorities` for `weighted` and `keep_fraction` for `union`), and the fused scores planned:
    `allocation="global"` is CUT's cost-aware global ranking (`cut.budget.make_plan`), `"uniform"` keeps
    the same fraction of every group (`uniform_plan`, an ablation).
    """
    fused = fusion.fuse(dict(per_task), rule=rule, normalisation=normalise, priorities=priorities,
                        keep_fraction=keep_fraction)
    tasks = tuple(tasks) if tasks is not None else None
    if allocation == "global":
        return make_plan(fused, analysis, budget_kind, budget_value, options, base_model_sha256=base_model_sha256,
                         tasks=tasks, method=method)
    if allocation == "uniform":
        return uniform_plan(fused, analysis, budget_kind, budget_value, options, base_model_sha256=base_model_sha256,
                            tasks=tasks, method=method)
    raise ValueError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")


# ----------------------------------------------------------------------------------------------------
# Plans from explicit kept counts


def _smallest_allowed_at_least(allowed: np.ndarray, value: float) -> int:
    i = min(int(np.searchsorted(allowed, value)), len(allowed) - 1)
    return int(allowed[i])


def plan_from_counts(
    order_scores: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    analysis: GroupAnalysis,
    budget_kind: str,
    budget_value: float,
    *,
    base_model_sha256: str = "",
    tasks: Sequence[str] | None = None,
    method: str = "",
) -> PruningPlan:
    """Keep, in every group, its `counts[g]` channels scoring highest (ties: lower index first)."""
    cost = analysis.cost
    keep = {}
    for g in cost.group_names:
        order = np.argsort(-np.asarray(order_scores[g], dtype=np.float64), kind="stable")
        keep[g] = tuple(sorted(int(i) for i in order[: int(counts[g])]))
    kept = cost.counts_vector({g: len(v) for g, v in keep.items()})
    memory = budget_kind == MEMORY  # params and MACs always; memory's bytes too (latency would need the table)
    return PruningPlan(
        base_model_sha256=base_model_sha256,
        tasks=tuple(tasks if tasks is not None else analysis.task_names),
        keep=keep,
        group_sizes={g: int(s) for g, s in zip(cost.group_names, cost.group_sizes, strict=True)},
        budget_kind=budget_kind,
        budget_value=float(budget_value),
        method=method,
        achieved=achieved_of(memory_cost(analysis) if memory else cost, MEMORY if memory else "params", kept),
    )


def _bisect(fits, iterations: int = 40) -> float:
    """Largest x in (0, 1] with fits(x) (fits monotone: true up to some point); 0 if none."""
    if fits(1.0):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def uniform_counts(analysis: GroupAnalysis, budget_kind: str, budget_value: float,
                   options: BudgetOptions | None = None) -> tuple[float, dict[str, int]]:
    """(r, counts): one kept fraction r for every group, and per group a kept count within one allowed step
    of r x size, that together meet the budget.

    r is the largest fraction whose counts (r x size rounded down to an allowed count) meet the budget;
    then groups are rounded up instead (largest remainder first) while the budget still holds, so the
    reached fraction is close to the budget although allowed counts are coarse (multiples of round_to).
    """
    check_budget(budget_kind, budget_value)
    cost, options = cost_for(analysis, budget_kind, options or BudgetOptions())
    names = list(cost.group_names)
    sizes = {g: int(s) for g, s in zip(names, cost.group_sizes, strict=True)}
    allowed = group_allowed(cost, options)
    target = budget_value * cost.dense(budget_kind)

    def floor_allowed(g: str, x: float) -> int:
        i = int(np.searchsorted(allowed[g], x + 1e-9, side="right")) - 1
        return int(allowed[g][max(i, 0)])

    def counts_at(r: float) -> dict[str, int]:
        return {g: floor_allowed(g, r * sizes[g]) for g in names}

    def fits(counts: dict[str, int]) -> bool:
        return cost.cost(budget_kind, cost.counts_vector(counts)) <= target

    smallest = {g: int(allowed[g][0]) for g in names}
    if not fits(smallest):
        raise ValueError(f"budget {budget_value} of {budget_kind} is unreachable with a uniform ratio: the minimum "
                         "channels of every group already exceed it")
    r = _bisect(lambda x: fits(counts_at(x)))
    counts = counts_at(r)
    remainders = []
    for g in names:
        nxt = np.searchsorted(allowed[g], counts[g], side="right")
        if nxt < len(allowed[g]) and counts[g] < r * sizes[g]:
            up = int(allowed[g][nxt])
            remainders.append(((r * sizes[g] - counts[g]) / (up - counts[g]), g, up))
    for _, g, up in sorted(remainders, key=lambda x: (-x[0], x[1])):
        trial = {**counts, g: up}
        if fits(trial):
            counts = trial
    return r, counts


def uniform_plan(
    scores: Mapping[str, np.ndarray],
    analysis: GroupAnalysis,
    budget_kind: str,
    budget_value: float,
    options: BudgetOptions | None = None,
    *,
    base_model_sha256: str = "",
    tasks: Sequence[str] | None = None,
    method: str = "",
) -> PruningPlan:
    """The same kept fraction in every group (the largest that meets the budget); within each group the
    channels with the highest `scores` are kept (a uniform per-layer ratio, as in Li et al. 2017)."""
    _, counts = uniform_counts(analysis, budget_kind, budget_value, options)
    return plan_from_counts(scores, counts, analysis, budget_kind, budget_value,
                            base_model_sha256=base_model_sha256, tasks=tasks, method=method)


def union_plan(
    per_task: Mapping[str, Mapping[str, np.ndarray]],
    analysis: GroupAnalysis,
    budget_kind: str,
    budget_value: float,
    options: BudgetOptions | None = None,
    *,
    base_model_sha256: str = "",
    tasks: Sequence[str] | None = None,
    method: str = "",
) -> tuple[PruningPlan, float]:
    """DiSparse's union arbiter at the budget: (plan, q).

    Each task keeps its top fraction q of the channels it scores (one top-k over its groups, scores
    normalised by the task's total as DiSparse does, which leaves its ranking unchanged); a group keeps
    the units any task keeps, rounded up to an allowed count (extra channels by the strongest task
    score); q is bisected to the largest fraction whose plan meets the budget.
    """
    check_budget(budget_kind, budget_value)
    cost, options = cost_for(analysis, budget_kind, options or BudgetOptions())
    names = list(cost.group_names)
    allowed = group_allowed(cost, options)
    target = budget_value * cost.dense(budget_kind)

    def at(q: float) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        fused = fusion.fuse(dict(per_task), rule="union", normalisation="global", keep_fraction=q)
        counts = {g: _smallest_allowed_at_least(allowed[g], float((fused[g] >= 1.0).sum())) for g in names}
        return fused, counts

    def fits(q: float) -> bool:
        return cost.cost(budget_kind, cost.counts_vector(at(q)[1])) <= target

    q = _bisect(fits)
    if q <= 0:
        raise ValueError(f"budget {budget_value} of {budget_kind} is unreachable by the union arbiter")
    fused, counts = at(q)
    plan = plan_from_counts(fused, counts, analysis, budget_kind, budget_value,
                            base_model_sha256=base_model_sha256, tasks=tasks, method=method)
    return plan, q


__all__ = [
    "ALLOCATIONS",
    "DEFAULT_NORMALISE",
    "DEFAULT_RULE",
    "PlanRequest",
    "PlanResult",
    "plan_from_counts",
    "plan_from_scores",
    "union_plan",
    "uniform_counts",
    "uniform_plan",
]
