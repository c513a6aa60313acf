"""The compared pruning methods, each a recipe (criterion, per-task or summed loss, normalisation, fusion).

Every method prunes the *decomposed* model (backbone + the selected heads) to the same budget with the
same planner (`cut.budget`, cost-aware ranking), so they differ only in how channels are scored and fused:

| method    | scores                                      | normalise       | fuse  |
|-----------|---------------------------------------------|-----------------|-------|
| random    | uniform floats, seeded                      | per layer, mean | -     |
| magnitude | L1 of the group's weights (data-free)       | per layer, mean | -     |
| snip      | saliency sum abs(w*grad) of the summed loss | per layer, mean | -     |
| disparse  | saliency per task                           | per task total  | union |
| cut       | fisher per task                             | per task total  | mean  |
| taylor-tp | torch-pruning GroupTaylorImportance + MetaPruner (global pruning), summed loss        |

Single-objective methods are normalised per layer. For snip that is its better variant: ranking its
raw summed-loss saliency globally (as SNIP does per weight) let one task's gradients dominate and
measured far worse on scenes (delta_m -116 against -25, mean of params budgets 0.5/0.7/0.9, no
fine-tune; benchmarks/fusion_choice.py --baselines), so the comparison with cut is conservative. `disparse` follows the DiSparse code: per-task scores normalised by the
task's total, a per-task top-k at the budget's channel fraction (`cut.budget.uniform_keep_fraction`),
union of the kept sets. `cut`'s defaults (fisher, per-task total, mean) were chosen by measurement,
see `cut.fusion`: over seg+depth+normals and seg+normals at params budgets 0.5/0.7/0.9 (no fine-tune,
5 seeds) fisher beat taylor by 0.8-1.6 points of delta_m and act-grad / saliency by more.

`taylor-tp` runs torch-pruning as is (its importance, its normalisation, its global threshold, its
round_to) in interactive mode, so the model is never modified: the channels each group would lose are
read from the groups it yields and turned into a PruningPlan (a test checks that applying that plan
gives exactly torch-pruning's own pruned model). Its only input from us is the channel pruning ratio,
found by bisection as the largest one whose plan fits the budget (torch-pruning's ratio counts
channels, not parameters); it does not use our planner, so it lands near, not at, the budget.

Unstructured mode (`masks_with`) uses the same recipes on per-weight scores |w * grad| (magnitude: |w|;
single-objective methods rank raw scores globally; cut normalises per task and fuses).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp

from cut import fusion
from cut.budget import BudgetOptions, check_budget, make_plan, uniform_keep_fraction
from cut.compact import unstructured_masks
from cut.groups import GroupAnalysis, analyse, example_input
from cut.importance import (
    Batch,
    score_summed,
    score_tasks,
    summed_objective,
    task_objective,
    weight_scores,
)
from cut.models import MultiTaskModel
from cut.plan import PruningPlan

DEFAULT_CRITERION = "fisher"


@dataclass
class PlanResult:
    plan: PruningPlan
    seconds: dict[str, float]  # scoring, fusion, planning
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    criterion: str
    per_task: bool
    normalise: str = fusion.DEFAULT_NORMALISE
    fusion: str | None = None  # per-task methods only
    planner: Callable[..., PlanResult] | None = None  # a method that plans by itself (taylor-tp)
    summary: str = ""


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


def _taylor_tp(request: PlanRequest, method: Method) -> PlanResult:
    return TorchPruningTaylor(request).run(method.name)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("random", "random", per_task=False, normalise="mean", summary="random channels (uniform scores)"),
        Method("magnitude", "magnitude", per_task=False, normalise="mean",
               summary="L1 norm of the weights, one-shot"),
        Method("snip", "saliency", per_task=False, normalise="mean", summary="|w*grad| of the summed loss"),
        Method("disparse", "saliency", per_task=True, normalise="global", fusion="union",
               summary="per-task |w*grad|, per-task top-k, union"),
        Method("taylor-tp", "taylor", per_task=False, planner=_taylor_tp,
               summary="torch-pruning GroupTaylorImportance + MetaPruner, summed loss"),
        Method("cut", DEFAULT_CRITERION, per_task=True, normalise=fusion.DEFAULT_NORMALISE, fusion=fusion.DEFAULT_RULE,
               summary="per-task scores, per-task normalised mean fusion"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def plan_with(
    method: str,
    request: PlanRequest,
    criterion: str | None = None,
    fusion_rule: str | None = None,
    normalise: str | None = None,
) -> PlanResult:
    """Score, fuse and plan with `method` (criterion / fusion / normalisation overridable)."""
    check_budget(request.budget_kind, request.budget_value)
    spec = get_method(method)
    if spec.planner is not None:
        return spec.planner(request, spec)
    criterion = criterion or spec.criterion
    norm = normalise or spec.normalise
    rule = (fusion_rule or spec.fusion) if spec.per_task else "mean"
    model, tasks = request.model, list(request.tasks)
    analysis = analyse(model)
    t0 = time.perf_counter()
    if spec.per_task:
        per_task = score_tasks(model, request.batches, tasks, criterion, len(request.batches), request.seed)
    else:
        per_task = {"sum": score_summed(model, request.batches, tasks, criterion, len(request.batches), request.seed)}
    t1 = time.perf_counter()
    keep_fraction = (uniform_keep_fraction(analysis, request.budget_kind, request.budget_value)
                     if rule == "union" else None)
    fused = fusion.fuse(per_task, rule=rule, normalisation=norm, priorities=request.priorities,
                        keep_fraction=keep_fraction)
    t2 = time.perf_counter()
    plan = make_plan(fused, analysis, request.budget_kind, request.budget_value, request.options,
                     base_model_sha256=request.base_model_sha256, tasks=request.tasks, method=method)
    t3 = time.perf_counter()
    info = {"criterion": criterion, "normalise": norm, "fusion": rule if spec.per_task else None}
    if keep_fraction is not None:
        info["keep_fraction"] = keep_fraction
    return PlanResult(plan, {"scoring": t1 - t0, "fusion": t2 - t1, "planning": t3 - t2}, info)


# ----------------------------------------------------------------------------------------------------
# torch-pruning's Taylor pruner as a peer


class TorchPruningTaylor:
    """GroupTaylorImportance + MetaPruner(global_pruning=True) at the channel ratio that meets the budget."""

    def __init__(self, request: PlanRequest, max_iterations: int = 18) -> None:
        self.request = request
        self.model = request.model
        self.analysis: GroupAnalysis = analyse(self.model)
        self.max_iterations = max_iterations
        self._meta: tp.pruner.MetaPruner | None = None

    def run(self, method_name: str = "taylor-tp") -> PlanResult:
        t0 = time.perf_counter()
        saved = {n: p.grad for n, p in self.model.named_parameters()}
        was_training = self.model.training
        self.model.eval()
        try:
            self._accumulate_grads()
            t1 = time.perf_counter()
            ratio, removed = self._search()
        finally:
            for n, p in self.model.named_parameters():
                p.grad = saved[n]
            self.model.train(was_training)
        t2 = time.perf_counter()
        plan = self._plan(removed, method_name)
        return PlanResult(plan, {"scoring": t1 - t0, "fusion": 0.0, "planning": t2 - t1},
                          {"criterion": "tp.GroupTaylorImportance", "pruning_ratio": ratio})

    def _accumulate_grads(self) -> None:
        objective = summed_objective(self.model, list(self.request.tasks))
        for p in self.model.parameters():
            p.grad = None
        for images, targets in self.request.batches:
            objective(self.model(images), targets).backward()

    def _pruner(self) -> tp.pruner.MetaPruner:
        if self._meta is None:
            self._meta = tp.pruner.MetaPruner(
                self.model, example_input(self.model), importance=tp.importance.GroupTaylorImportance(),
                global_pruning=True, pruning_ratio=0.5, ignored_layers=self.model.classifier_layers(),
                round_to=self.request.options.round_to or None,
            )
        return self._meta

    def _removed_at(self, ratio: float) -> dict[str, list[int]] | None:
        """group name -> channels torch-pruning would remove at `ratio` (None: it would empty a group).

        One MetaPruner (one graph trace) serves every trial: its per-step ratio is reset and its step run
        in interactive mode, which yields the groups it would prune without pruning them.
        """
        if ratio <= 0:
            return {}
        pruner = self._pruner()
        pruner.per_step_pruning_ratio = pruner.iterative_pruning_ratio_scheduler(ratio, pruner.iterative_steps)
        pruner.current_step = 0
        names = {m: n for n, m in self.model.named_modules()}
        owner = {m: g.name for g in self.analysis.groups for m in g.out_modules}
        removed: dict[str, list[int]] = {}
        for group in pruner.step(interactive=True):
            if len(group[0].idxs) == 0:  # at small ratios torch-pruning yields groups that remove nothing
                continue
            root = group[0].dep.target.module
            gname = owner.get(names.get(root))
            if gname is None:
                raise RuntimeError(f"torch-pruning pruned {names.get(root)!r}, which is in no known group")
            named = self.model.get_submodule(gname)
            idxs = next(it.idxs for it in group if it.dep.target.module is named
                        and pruner.DG.is_out_channel_pruning_fn(it.dep.handler))
            removed[gname] = sorted(set(removed.get(gname, [])) | {int(i) for i in idxs})
        if any(len(v) >= self.analysis.sizes[g] for g, v in removed.items()):
            return None
        return removed

    def _cost(self, removed: dict[str, list[int]]) -> int:
        counts = {g: self.analysis.sizes[g] - len(v) for g, v in removed.items()}
        return self.analysis.cost.cost(self.request.budget_kind, self.analysis.cost.counts_vector(counts))

    def _search(self) -> tuple[float, dict[str, list[int]]]:
        target = self.request.budget_value * self.analysis.cost.dense(self.request.budget_kind)
        lo, hi, best = 0.0, 1.0, None
        for _ in range(self.max_iterations):
            mid = (lo + hi) / 2
            removed = self._removed_at(mid)
            if removed is not None and self._cost(removed) <= target:
                hi, best = mid, (mid, removed)
            else:
                lo = mid
            if hi - lo < 1e-3:
                break
        if best is None:
            raise ValueError(f"taylor-tp cannot reach budget {self.request.budget_value} of {self.request.budget_kind}")
        return best

    def _plan(self, removed: dict[str, list[int]], method_name: str) -> PruningPlan:
        sizes = self.analysis.sizes
        keep = {g: tuple(i for i in range(n) if i not in set(removed.get(g, ()))) for g, n in sizes.items()}
        counts = {g: len(v) for g, v in keep.items()}
        params, macs = self.analysis.cost.evaluate(self.analysis.cost.counts_vector(counts))
        cost = self.analysis.cost
        r = self.request
        return PruningPlan(
            base_model_sha256=r.base_model_sha256, tasks=r.tasks, keep=keep, group_sizes=dict(sizes),
            budget_kind=r.budget_kind, budget_value=float(r.budget_value), method=method_name,
            achieved={"params_ratio": params / cost.dense_params, "macs_ratio": macs / cost.dense_macs,
                      "params": float(params), "macs": float(macs)},
        )


# ----------------------------------------------------------------------------------------------------
# Unstructured masks


def masks_with(
    method: str,
    model: MultiTaskModel,
    batches: list[Batch],
    tasks: list[str],
    sparsity: float,
    seed: int = 0,
    fusion_rule: str | None = None,
) -> dict[str, torch.Tensor]:
    """weight name -> bool mask at `sparsity` over all Conv2d/Linear weights, with `method`'s recipe."""
    spec = get_method(method)
    if spec.planner is not None:
        raise ValueError(f"method {method!r} is structured only")
    if spec.criterion in ("random", "magnitude"):
        return unstructured_masks(model, spec.criterion, sparsity, seed)
    was_training = model.training
    model.eval()
    try:
        if spec.per_task:
            per = weight_scores(model, batches, {t: task_objective(model, t) for t in tasks})
        else:
            per = weight_scores(model, batches, {"sum": summed_objective(model, tasks)})
    finally:
        model.train(was_training)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    arrays = {obj: {n: v.reshape(-1).double().cpu().numpy() for n, v in s.items()} for obj, s in per.items()}
    rule = (fusion_rule or spec.fusion) if spec.per_task else "mean"
    norm = spec.normalise if spec.per_task else "none"  # SNIP ranks raw saliency globally
    fused = fusion.fuse(arrays, rule=rule, normalisation=norm,
                        keep_fraction=(1 - sparsity) if rule == "union" else None)
    scores = {n: torch.from_numpy(np.asarray(v, dtype=np.float64)).reshape(shapes[n]) for n, v in fused.items()}
    return unstructured_masks(model, scores, sparsity, seed)


__all__ = [
    "DEFAULT_CRITERION",
    "METHODS",
    "Method",
    "PlanRequest",
    "PlanResult",
    "TorchPruningTaylor",
    "get_method",
    "masks_with",
    "plan_with",
]
