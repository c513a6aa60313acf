"""The compared pruning methods: CUT, the published baselines, and labelled ablations of CUT's parts.

Every method prunes the *decomposed* model (backbone + the selected heads) to the same budget, with the
same scoring batches and the same allowed channel counts (`cut.budget.BudgetOptions`: multiples of
`round_to`, at least `min_keep` per group). `plan_with(name, request)` runs one.

CUT (this project):

| name | scores | normalise | fuse | allocation |
|---|---|---|---|---|
| `cut` | group Fisher per task | per task total (`global`) | `weighted` (= mean without priorities) | cost-aware global ranking |

It plans through `cut.planner.plan_from_scores`, the function the federation's server plans with.

Baselines (as published, made structured as `cut.baselines` explains; sources there):

| name | what it is |
|---|---|
| `random` | uniform per-layer ratio to the budget (exact counts), random channels within each group |
| `l1` (alias `magnitude`) | uniform per-layer ratio to the budget (exact counts), largest-L1 filters kept within each group (Li et al. 2017) |
| `snip` | summed-loss channel saliency sum abs(w * dL/dw), one global ranking to the budget (Lee et al. 2019) |
| `disparse` | per-task saliency, per-task top-q, union arbiter, q bisected to the budget (Sun et al. 2022) |
| `tp` (alias `torch-pruning`) | Torch-Pruning's MetaPruner, global pruning, its best configuration of the grid below |

Torch-Pruning's grid (`cut.baselines.TP_GRID`, 16 points, each also a method `tp-...`), from the
settings its own benchmarks and examples use: importance {`GroupMagnitudeImportance(p=2)`,
`GroupTaylorImportance`} x max_pruning_ratio {0.75, 1.0} x ignored early layers {stem + first stage,
none (head classifiers only)} x iterative steps {1 (one shot, channel ratio bisected to the budget), 100
(its benchmarks' prune-to-target loop)}. Chosen on tuning seed 100, which is no reported seed (scenes,
seg+depth, params budgets 0.3 / 0.5 / 0.7, runs/tp-tuning-stage1 and -stage2):

1. all 16 without recovery. max_pruning_ratio 0.75 and 1.0 gave the same one-shot plans (no group
   reaches the cap at these budgets; the 100-step loop differed by < 1 point); the 100-step loop was worse than one shot everywhere (l2/early: -431 / -201 /
   -49 against -80 / -47 / -33); the four one-shot configurations ranked l2/early (mean -53.6),
   taylor/early (-78.0), l2/all (-91.3), taylor/all (-126.8).
2. those four with the bench's recovery (100 steps x 32, lr 1e-3, half task loss half distillation):
   l2/early -9.06 / -3.30 / -2.12 (mean -4.83), taylor/early -12.43 / -7.36 / -3.11, l2/all -20.57 /
   -16.43 / -2.83, taylor/all -32.61 / -22.91 / -4.55.

So `tp` = `tp-l2-max0.75-early-oneshot` (`cut.baselines.TP_CHOICE`), best at every budget in both stages.
The old `taylor-tp` (Taylor, no protected layers, no cap, one shot) is the grid point
`tp-taylor-max1-all-oneshot` (alias `taylor-tp`).

Ablations of CUT's parts (never baselines; each changes one thing of `cut`, or reproduces an earlier,
planner-based comparison):

| name | what changes |
|---|---|
| `cut-uniform-planner` | the fused scores kept at a uniform per-layer ratio, exact counts as `l1` (no cost-aware global planner) |
| `cut-no-cost-aware` | global ranking by fused score alone (`BudgetOptions.cost_aware=False`) |
| `cut-no-normalise` | raw task scores fused (no per-task normalisation) |
| `cut-layer-normalise` | per-(task, layer) mean normalisation instead of per-task |
| `cut-summed` | one Fisher score of the summed loss (no per-task scoring, no fusion) |
| `cut-planner-random` | random scores, per-layer mean normalised, CUT's planner (the planner alone) |
| `cut-planner-l1` | group L1 scores, per-layer mean normalised, CUT's planner |
| `cut-planner-snip` | summed-loss saliency, per-layer mean normalised, CUT's planner |
| `cut-union` | per-task saliency, per-task normalised, union fusion, CUT's planner |

Unstructured mode (`masks_with`): per-weight masks over all Conv2d/Linear weights at a sparsity:
`random` (random weights), `l1` (smallest |w| removed), `snip` (|w * grad| of the summed loss, one
global ranking), `disparse` (per-task |w * grad|, per-task top-k, union) and `cut` (per-task |w * grad|,
per-task normalised, mean).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cut import baselines, fusion
from cut.budget import check_budget
from cut.compact import unstructured_masks
from cut.groups import analyse
from cut.importance import (
    Batch,
    score_summed,
    score_tasks,
    summed_objective,
    task_objective,
    weight_scores,
)
from cut.models import MultiTaskModel
from cut.planner import DEFAULT_RULE, PlanRequest, PlanResult, plan_from_scores

DEFAULT_CRITERION = "fisher"
KINDS = ("cut", "baseline", "ablation", "tp-grid")


@dataclass(frozen=True)
class Recipe:
    """A CUT-family recipe: scores -> normalise -> fuse -> allocate (`cut.planner.plan_from_scores`)."""

    criterion: str = DEFAULT_CRITERION
    per_task: bool = True
    normalise: str = fusion.DEFAULT_NORMALISE
    rule: str = DEFAULT_RULE
    allocation: str = "global"
    cost_aware: bool = True


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # one of KINDS
    summary: str
    recipe: Recipe | None = None  # CUT-family methods
    planner: Callable[[PlanRequest, str], PlanResult] | None = None  # baselines: plan by themselves


def _tp(config: baselines.TPConfig) -> Callable[[PlanRequest, str], PlanResult]:
    return lambda request, name: baselines.tp_baseline(request, name, config)


_METHODS: list[Method] = [
    Method("random", "baseline", "uniform per-layer ratio, random channels", planner=baselines.random_baseline),
    Method("l1", "baseline", "uniform per-layer ratio, largest-L1 filters (Li et al. 2017)",
           planner=baselines.l1_baseline),
    Method("snip", "baseline", "summed-loss |w*grad| per channel, global ranking (Lee et al. 2019)",
           planner=baselines.snip_baseline),
    Method("disparse", "baseline", "per-task |w*grad|, per-task top-q, union (Sun et al. 2022)",
           planner=baselines.disparse_baseline),
    Method("tp", "baseline", f"Torch-Pruning MetaPruner, {baselines.TP_CHOICE.name} (best of its grid)",
           planner=_tp(baselines.TP_CHOICE)),
    Method("cut", "cut", "per-task Fisher, per-task normalised weighted fusion, cost-aware planner", Recipe()),
    Method("cut-uniform-planner", "ablation", "cut's fused scores at a uniform per-layer ratio",
           Recipe(allocation="uniform")),
    Method("cut-no-cost-aware", "ablation", "cut ranked by fused score alone", Recipe(cost_aware=False)),
    Method("cut-no-normalise", "ablation", "cut without per-task normalisation", Recipe(normalise="none")),
    Method("cut-layer-normalise", "ablation", "cut with per-(task, layer) mean normalisation",
           Recipe(normalise="mean")),
    Method("cut-summed", "ablation", "Fisher of the summed loss, no per-task fusion", Recipe(per_task=False)),
    Method("cut-planner-random", "ablation", "random scores through cut's planner",
           Recipe("random", per_task=False, normalise="mean")),
    Method("cut-planner-l1", "ablation", "group L1 through cut's planner",
           Recipe("magnitude", per_task=False, normalise="mean")),
    Method("cut-planner-snip", "ablation", "summed-loss saliency, per-layer normalised, cut's planner",
           Recipe("saliency", per_task=False, normalise="mean")),
    Method("cut-union", "ablation", "per-task saliency, union fusion, cut's planner",
           Recipe("saliency", rule="union")),
] + [Method(c.name, "tp-grid", f"Torch-Pruning grid point {c.name}", planner=_tp(c)) for c in baselines.TP_GRID]

METHODS: dict[str, Method] = {m.name: m for m in _METHODS}
ALIASES = {"magnitude": "l1", "torch-pruning": "tp", "taylor-tp": "tp-taylor-max1-all-oneshot"}
BASELINES = tuple(m.name for m in _METHODS if m.kind == "baseline")
DEFAULT_BENCH_METHODS = (*BASELINES, "cut")


def canonical(name: str) -> str:
    """The registered name of `name` (aliases resolved); ValueError for an unknown method."""
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(METHODS)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return name


def get_method(name: str) -> Method:
    return METHODS[canonical(name)]


def plan_with(
    method: str,
    request: PlanRequest,
    criterion: str | None = None,
    fusion_rule: str | None = None,
    normalise: str | None = None,
) -> PlanResult:
    """Score and plan with `method` (criterion / fusion / normalisation overridable for CUT's family)."""
    check_budget(request.budget_kind, request.budget_value)
    spec = get_method(method)
    if spec.recipe is None:
        if criterion or fusion_rule or normalise:
            raise ValueError(f"method {spec.name!r} is a published recipe: criterion, fusion and normalisation "
                             "cannot be overridden")
        return spec.planner(request, spec.name)
    recipe = dataclasses.replace(spec.recipe, criterion=criterion or spec.recipe.criterion,
                                 rule=fusion_rule or spec.recipe.rule, normalise=normalise or spec.recipe.normalise)
    return _plan_recipe(spec.name, recipe, request)


def _plan_recipe(name: str, recipe: Recipe, request: PlanRequest) -> PlanResult:
    model, tasks = request.model, list(request.tasks)
    analysis = analyse(model)
    t0 = time.perf_counter()
    if recipe.per_task:
        per_task = score_tasks(model, request.batches, tasks, recipe.criterion, len(request.batches), request.seed)
    else:
        per_task = {"sum": score_summed(model, request.batches, tasks, recipe.criterion, len(request.batches),
                                        request.seed)}
    t1 = time.perf_counter()
    rule = recipe.rule if recipe.per_task else "mean"
    keep_fraction = None
    if rule == "union":
        from cut.budget import uniform_keep_fraction

        keep_fraction = uniform_keep_fraction(analysis, request.budget_kind, request.budget_value)
    options = request.options if recipe.cost_aware else dataclasses.replace(request.options, cost_aware=False)
    if recipe.allocation == "uniform":  # the same exact-ratio counts as the uniform baselines
        options = baselines.uniform_options(options)
    plan = plan_from_scores(
        per_task, analysis, request.budget_kind, request.budget_value, options=options,
        priorities=request.priorities, normalise=recipe.normalise, rule=rule, keep_fraction=keep_fraction,
        allocation=recipe.allocation, base_model_sha256=request.base_model_sha256, tasks=request.tasks, method=name,
    )
    t2 = time.perf_counter()
    info = {"criterion": recipe.criterion, "normalise": recipe.normalise, "fusion": rule if recipe.per_task else None,
            "allocation": recipe.allocation, "cost_aware": recipe.cost_aware}
    if keep_fraction is not None:
        info["keep_fraction"] = keep_fraction
    return PlanResult(plan, {"scoring": t1 - t0, "fusion": 0.0, "planning": t2 - t1}, info)


# ----------------------------------------------------------------------------------------------------
# Unstructured masks

_UNSTRUCTURED = {"random", "l1", "snip", "disparse", "cut"}


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
    name = canonical(method)
    if name not in _UNSTRUCTURED:
        raise ValueError(f"method {name!r} is structured only; unstructured: {', '.join(sorted(_UNSTRUCTURED))}")
    if name in ("random", "l1"):
        return unstructured_masks(model, "random" if name == "random" else "magnitude", sparsity, seed)
    was_training = model.training
    model.eval()
    per_task = name != "snip"
    try:
        if per_task:
            per = weight_scores(model, batches, {t: task_objective(model, t) for t in tasks})
        else:
            per = weight_scores(model, batches, {"sum": summed_objective(model, tasks)})
    finally:
        model.train(was_training)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    arrays = {obj: {n: v.reshape(-1).double().cpu().numpy() for n, v in s.items()} for obj, s in per.items()}
    rule = {"snip": "mean", "disparse": "union", "cut": fusion_rule or "mean"}[name]
    norm = "none" if name == "snip" else "global"  # SNIP ranks raw saliency globally
    fused = fusion.fuse(arrays, rule=rule, normalisation=norm,
                        keep_fraction=(1 - sparsity) if rule == "union" else None)
    scores = {n: torch.from_numpy(np.asarray(v, dtype=np.float64)).reshape(shapes[n]) for n, v in fused.items()}
    return unstructured_masks(model, scores, sparsity, seed)


__all__ = [
    "ALIASES",
    "BASELINES",
    "DEFAULT_BENCH_METHODS",
    "DEFAULT_CRITERION",
    "KINDS",
    "METHODS",
    "Method",
    "PlanRequest",
    "PlanResult",
    "Recipe",
    "canonical",
    "get_method",
    "masks_with",
    "plan_with",
]
