"""The server's model side: the base model, plans per device, and compact models built once per plan.

A plan depends on (task subset, budget, priorities, fused scores); with personalisation off, devices that
agree on the first three share one plan. A latency budget plans against the table the device measured
on its own runtime (cut.latency), so only devices that sent the same table share its plan. A memory budget
in bytes is turned into a fraction of the dense decomposed model's memory, computed here from the model
(cut.memory). A compact model depends only on its plan, so it is built (pruned
with torch-pruning, hashed, its spec encoded) once per plan hash, however many devices receive it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cut.budget import BudgetOptions
from cut.checkpoint import load_model
from cut.compact import compact_model
from cut.fusion import TaskScores
from cut.groups import GroupAnalysis, analyse
from cut.latency import CHECK_TOLERANCE, with_measured_plan
from cut.memory import memory_fraction
from cut.messages import Budget, CompactModelSpec
from cut.models import MultiTaskModel, count_params
from cut.plan import PruningPlan
from cut.planner import plan_from_scores
from cut.wire import arrays_sha256, encode_spec
from protocol.records import arrays_state, state_arrays


@dataclass
class BaseModel:
    """The pre-trained multi-task model every device's plan is cut from."""

    directory: Path
    model: MultiTaskModel
    card: dict
    sha256: str
    model_id: str
    _decomposed: dict[tuple[str, ...], MultiTaskModel] = field(default_factory=dict)
    _arrays: dict[tuple[str, ...], tuple[dict[str, np.ndarray], str]] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> BaseModel:
        model, card = load_model(directory)
        model_id = f"{card.get('dataset', 'model')}-{model.config.backbone}-x{model.config.width:g}"
        return cls(Path(directory), model, card, str(card["weights_sha256"]), model_id)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.model.task_names)

    def canonical(self, tasks: Sequence[str]) -> tuple[str, ...]:
        """`tasks` in the base model's head order: one name for one subset, whatever order devices use."""
        return tuple(t for t in self.task_names if t in set(tasks))

    def decomposed(self, tasks: tuple[str, ...]) -> MultiTaskModel:
        if tasks not in self._decomposed:
            self._decomposed[tasks] = self.model.decompose(list(tasks)).eval()
        return self._decomposed[tasks]

    def analysis(self, tasks: tuple[str, ...]) -> GroupAnalysis:
        return analyse(self.decomposed(tasks))

    def task_groups(self, tasks: tuple[str, ...]) -> dict[str, list[str]]:
        """task -> the groups its scores must cover (every shared group and its own head's)."""
        analysis = self.analysis(tasks)
        return {t: [g.name for g in analysis.groups_of_task(t)] for t in tasks}

    def decomposed_arrays(self, tasks: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str]:
        """The decomposed weights as arrays and their sha256 (arrays transport; cached per subset)."""
        if tasks not in self._arrays:
            arrays = state_arrays(self.decomposed(tasks))
            self._arrays[tasks] = (arrays, arrays_sha256(arrays))
        return self._arrays[tasks]

    def dense_bytes(self, tasks: tuple[str, ...]) -> int:
        return int(sum(a.nbytes for a in self.decomposed_arrays(tasks)[0].values()))

    def architecture(self, tasks: tuple[str, ...]) -> dict:
        return json.loads(self.decomposed(tasks).config.to_json())


@dataclass(frozen=True)
class Build:
    """A compact model ready to deliver: its plan, encoded spec, weight arrays and their hash."""

    plan: PruningPlan
    spec_bytes: bytes
    arrays: dict[str, np.ndarray]
    weights_sha256: str
    params: int
    dense_params: int

    @property
    def params_ratio(self) -> float:
        return self.params / self.dense_params


class PlanBook:
    """Plans per device request and compact models per plan hash (both cached)."""

    def __init__(self, base: BaseModel, options: BudgetOptions, normalise: str = "global") -> None:
        self.base = base
        self.options = options
        self.normalise = normalise
        self._plans: dict[tuple, PruningPlan] = {}
        self.builds: dict[str, Build] = {}

    def plan(self, tasks: tuple[str, ...], budget: Budget, per_task: TaskScores,
             priorities: Mapping[str, float], cache_key: tuple | None = None) -> PruningPlan:
        """Fuse the per-task scores and cut to the budget; `cache_key` shares plans between devices."""
        value, options = budget.value, self.options
        if budget.kind == "latency":
            value, options = self.latency_budget(tasks, budget)
            cache_key = None if cache_key is None else (*cache_key, budget.milliseconds, budget.latency_table)
        elif budget.kind == "memory" and budget.memory_bytes:
            value = self.memory_budget(tasks, budget)
            cache_key = None if cache_key is None else (*cache_key, budget.memory_bytes)
        if cache_key is not None and cache_key in self._plans:
            return self._plans[cache_key]
        plan = plan_from_scores(per_task, self.base.analysis(tasks), budget.kind, value, options=options,
                                priorities=priorities, normalise=self.normalise, base_model_sha256=self.base.sha256,
                                tasks=tasks, method="cut")
        if cache_key is not None:
            self._plans[cache_key] = plan
        return plan

    def latency_budget(self, tasks: tuple[str, ...], budget: Budget) -> tuple[float, BudgetOptions]:
        """(fraction, options) of a device's latency budget: planned against the table it measured on its own
        runtime; ValueError (the device is excluded, with the reason) if the table is not for this model."""
        table = budget.latency_table
        if table is None:
            raise ValueError("latency budget without the device's latency table")
        if table.base_model_sha256 != self.base.sha256:
            raise ValueError(f"latency table measured for base model {table.base_model_sha256[:12]}..., not "
                             f"{self.base.sha256[:12]}...")
        if set(table.tasks) != set(tasks):
            raise ValueError(f"latency table measured for tasks {list(table.tasks)}, not {list(tasks)}")
        value = min(1.0, budget.milliseconds / table.dense_ms) if budget.milliseconds else budget.value
        return value, replace(self.options, latency=table)

    def memory_budget(self, tasks: tuple[str, ...], budget: Budget) -> float:
        """The fraction of the dense decomposed model's memory a device's budget in bytes is (1 at or above
        it: nothing pruned); ValueError (the device is excluded, with the reason) if it is below what the
        smallest plan needs."""
        return memory_fraction(self.base.analysis(tasks), budget.memory_bytes, self.options)

    def build(self, plan: PruningPlan) -> Build:
        """The compact model of `plan` (pruned once per plan hash)."""
        if plan.plan_hash not in self.builds:
            dense = self.base.decomposed(plan.tasks)
            compact = compact_model(dense, plan).eval()
            self.builds[plan.plan_hash] = self._package(plan, state_arrays(compact), count_params(compact),
                                                        count_params(dense))
        return self.builds[plan.plan_hash]

    def model(self, plan_hash: str) -> MultiTaskModel:
        """A fresh module holding a plan's current weights (eval mode)."""
        build = self.builds[plan_hash]
        model = compact_model(self.base.decomposed(build.plan.tasks), build.plan)
        model.load_state_dict(arrays_state(build.arrays))
        return model.eval()

    def with_weights(self, plan_hash: str, arrays: dict[str, np.ndarray]) -> Build:
        """Replace a plan's weights (after a FedAvg round) and re-hash them."""
        old = self.builds[plan_hash]
        self.builds[plan_hash] = self._package(old.plan, arrays, old.params, old.dense_params)
        return self.builds[plan_hash]

    def _package(self, plan: PruningPlan, arrays: dict[str, np.ndarray], params: int, dense_params: int) -> Build:
        sha = arrays_sha256(arrays)
        spec = CompactModelSpec(
            plan=plan,
            architecture=self.base.architecture(plan.tasks),
            weights_sha256=sha,
            tasks=plan.tasks,
            expected_metrics={k: float(v) for k, v in plan.achieved.items() if k.endswith("_ratio")},
        )
        return Build(plan, encode_spec(spec), arrays, sha, params, dense_params)


def latency_error(budget: Budget, latency_ms: float, dense_ms: float) -> float | None:
    """Measured / asked - 1 of a model a device timed at `latency_ms` (its dense model at `dense_ms` beside it)
    against its latency budget (ms budgets: against the milliseconds); None for another budget kind."""
    if budget.kind != "latency":
        return None
    if budget.milliseconds:
        return latency_ms / budget.milliseconds - 1
    return latency_ms / dense_ms / budget.value - 1


def over_latency(budget: Budget, latency_ms: float, dense_ms: float, tolerance: float = CHECK_TOLERANCE) -> bool:
    """Whether that model is over the device's latency budget by more than `tolerance` (and the server holds
    the device's table to plan it again with)."""
    error = latency_error(budget, latency_ms, dense_ms)
    return error is not None and budget.latency_table is not None and error > tolerance


UNDER_TOLERANCE = 2 * CHECK_TOLERANCE
"""How far under its latency budget a delivered model may measure before the server plans it again. Looser than
over (which breaks the budget): under only gives away some accuracy, and a simulated device's timing moves by a
few percent from one measurement to the next; at 3% both ways the server re-planned devices 3-4% under and
some came back over (BENCHMARKS.md, the federation's latency checks)."""


def off_latency(budget: Budget, latency_ms: float, dense_ms: float, tolerance: float = CHECK_TOLERANCE,
                under: float = UNDER_TOLERANCE) -> bool:
    """Whether that model is more than `tolerance` over the device's latency budget or more than `under` under
    it (and the server holds the device's table to plan it again with)."""
    error = latency_error(budget, latency_ms, dense_ms)
    return error is not None and budget.latency_table is not None and (error > tolerance or error < -under)


def measured_budget(budget: Budget, analysis: GroupAnalysis, plan: PruningPlan, measured_fraction: float) -> Budget:
    """`budget` whose latency table has the delivered `plan`'s time, measured on the device as a fraction of its
    dense model's, among its calibration points (`cut.latency.with_measured_plan`): planned again, the
    budget lands where that plan's measurement says it does."""
    return replace(budget, latency_table=with_measured_plan(budget.latency_table, analysis, plan, measured_fraction))


__all__ = ["BaseModel", "Build", "PlanBook", "latency_error", "measured_budget", "off_latency", "over_latency",
           "UNDER_TOLERANCE"]
