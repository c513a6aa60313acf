"""One CUT pruning run, top to bottom: decompose, score, fuse, plan, compact, recover, evaluate.

    decomposed = base.decompose(tasks)                       # step 1: keep the selected heads
    plan       = methods.plan_with(method, request)          # steps 2-3 + budget: scores -> fused -> plan
    compact    = compact.compact_model(decomposed, plan)     # step 4: physically smaller dense model
    recover(compact, teacher=decomposed, batches, config)    # optional recovery, the same for every method

The report says what was reached (params, MACs, bytes, memory: `cut.memory`; each as a ratio to the dense
decomposed model and to the full multi-task model), what decomposition alone saved, per-task metrics before
(dense decomposed) and after, delta_m (EVALUATION.md), and where the time went. Data loading is timed apart
from pruning.

Same data for every method: `Samples` materialises a split once as tensors, and `seed_data` draws from
it, per seed, the scoring batches (also used to re-estimate BatchNorm statistics) and the recovery
batches, so every method scores and trains on byte-identical batches.

Recovery is one stage for every method (`cut.recovery.recover`, configured by a `RecoveryConfig`,
visiting the recovery batches in an order seeded by the run's seed); its budget (steps x batch size,
learning rate, schedule, distillation) is reported with every result (`describe_recovery`).

Iterative mode (`iterative=K` > 1): prune in K steps, each removing the same fraction of what remains
(the kept fraction after step k is budget^(k/K)), re-scoring the current compact model with the method's
own criterion and re-estimating BatchNorm before each step, and recovering after each step for a K-th of
the recovery steps (its own warm-up + cosine; the teacher is always the dense decomposed model), so the
total recovery budget is the same as one shot's. The returned plan is the composition of the K plans,
a plan of the decomposed model like a one-shot plan.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from cut.budget import BudgetOptions, check_budget
from cut.checkpoint import state_dict_bytes
from cut.compact import compact_model, recalibrate_batchnorm
from cut.importance import Batch
from cut.memory import model_memory
from cut.methods import PlanRequest, PlanResult, canonical, plan_with
from cut.models import MultiTaskModel, count_macs, count_params
from cut.plan import PruningPlan
from cut.progress import progress_bar
from cut.recovery import RecoveryConfig, recover
from cut.train import evaluate, make_loader, multitask_delta

# ----------------------------------------------------------------------------------------------------
# Recovery: one stage for every method (cut.recovery), described the same way in every report


def describe_recovery(config: RecoveryConfig) -> str:
    """The recovery budget and recipe as tables print it."""
    if config.steps <= 0:
        return "none (0 steps)"
    parts = [f"{config.budget()} samples", f"AdamW lr {config.lr:g}",
             f"{config.warmup_fraction:.0%} warm-up + cosine", f"distillation weight {config.distill_weight:g}"]
    if config.feature_weight:
        parts.append(f"attention transfer {config.feature_weight:g}")
    if config.weight_decay:
        parts.append(f"weight decay {config.weight_decay:g}")
    if getattr(config, "freeze_bn", False):
        parts.append("BatchNorm frozen")
    if getattr(config, "head_resolution", False):
        parts.append("heads distilled before upsampling")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Same data for every method


@dataclass
class Samples:
    """A split materialised as tensors: images (N, C, H, W) and task -> targets (N, ...)."""

    images: torch.Tensor
    targets: dict[str, torch.Tensor]

    @classmethod
    def from_dataset(cls, dataset: Dataset, batch_size: int = 64) -> Samples:
        images, targets = [], {}
        for x, y in make_loader(dataset, batch_size):
            images.append(x)
            for k, v in y.items():
                targets.setdefault(k, []).append(v)
        return cls(torch.cat(images), {k: torch.cat(v) for k, v in targets.items()})

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: torch.Tensor) -> Batch:
        return self.images[idx], {k: v[idx] for k, v in self.targets.items()}

    def batches(self, batch_size: int) -> list[Batch]:
        """The split in order, in batches of `batch_size` (the evaluation set)."""
        n = len(self)
        return [self.batch(torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


@dataclass
class SeedData:
    """One seed's data, shared by every method and budget of that seed."""

    seed: int
    scoring: list[Batch]  # scoring and BatchNorm re-estimation
    recovery: list[Batch]  # recovery visits these in an order seeded by the same seed


def seed_data(train: Samples, seed: int, batch_size: int, num_batches: int, recovery: RecoveryConfig) -> SeedData:
    """The scoring batches (the start of one permutation of the train samples) and the recovery batches (a
    second permutation, min(N, steps x batch) samples in batches of the recovery batch size), both drawn
    from a generator seeded by `seed` alone."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    first = torch.randperm(n, generator=gen)
    scoring = [train.batch(first[i:i + batch_size]) for i in range(0, min(n, num_batches * batch_size), batch_size)]
    second = torch.randperm(n, generator=gen)[: min(n, max(recovery.steps, 0) * recovery.batch_size)]
    step = recovery.batch_size
    return SeedData(seed, scoring, [train.batch(second[i:i + step]) for i in range(0, len(second), step)])


# ----------------------------------------------------------------------------------------------------
# One run


def model_size(model: MultiTaskModel) -> dict[str, int]:
    """Parameters, MACs (one image at the config's input size), serialised state_dict bytes and the memory
    batch-1 inference needs (`cut.memory.model_memory`: float32 weights + peak activations, bytes)."""
    return {"params": count_params(model), "macs": count_macs(model), "bytes": len(state_dict_bytes(model)),
            "memory": model_memory(model)["memory_bytes"]}


def _memory_bytes(model: MultiTaskModel) -> int:
    return model_memory(model)["memory_bytes"]


def prune(
    base_model: MultiTaskModel,
    tasks: list[str],
    budget_kind: str,
    budget_value: float,
    method: str = "cut",
    criterion: str | None = None,
    fusion: str | None = None,
    train_loader: Iterable | None = None,
    test_loader: Iterable | None = None,
    num_batches: int = 4,
    finetune_steps: int = 0,
    seed: int = 0,
    base_sha256: str = "",
    *,
    options: BudgetOptions | None = None,
    priorities: Mapping[str, float] | None = None,
    normalise: str | None = None,
    eval_batches: int | None = None,
    dense_metrics: Mapping[str, Mapping[str, float]] | None = None,
    finetune_lr: float | None = None,
    recalibrate_bn: bool = True,
    recovery: RecoveryConfig | None = None,
    scoring_batches: list[Batch] | None = None,
    recovery_batches: Sequence[Batch] | None = None,
    progress: bool = True,
    iterative: int = 1,
) -> tuple[MultiTaskModel, PruningPlan, dict[str, Any]]:
    """Prune `base_model` for `tasks` to the budget; returns (compact model, plan, report).

    Data: `scoring_batches` (else the first `num_batches` of `train_loader`) score the channels and
    re-estimate BatchNorm statistics (`recalibrate_bn`: pruning shifts the statistics downstream layers
    normalise with); `recovery_batches` (else one pass of `train_loader`, at most `steps` batches) feed the
    recovery stage, `cut.recovery.recover` with `recovery` (else `finetune_steps` steps, at `finetune_lr` if
    given), distilled from the dense decomposed model.
    `dense_metrics` (the decomposed model's metrics on `test_loader`) may be passed to skip evaluating
    the dense model again when several methods share one base model. `iterative` = K > 1 prunes in K
    steps with recovery between them (module docstring); "before recovery" is then the model after the
    last pruning step, before the last recovery stage.
    """
    check_budget(budget_kind, budget_value)
    if not isinstance(iterative, int) or iterative < 1:
        raise ValueError(f"iterative must be a whole number of pruning steps >= 1, got {iterative!r}")
    method = canonical(method)
    if recovery is None:
        recovery = RecoveryConfig(steps=finetune_steps)
        recovery = replace(recovery, lr=finetune_lr) if finetune_lr is not None else recovery
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    decomposed = base_model.decompose(list(tasks))
    decomposed.eval()
    seconds["decompose"] = time.perf_counter() - t

    t = time.perf_counter()
    batches = list(scoring_batches) if scoring_batches is not None else _take(train_loader, num_batches)
    seconds["data"] = time.perf_counter() - t

    data: list[Batch] = []
    if recovery.steps > 0:
        data = list(recovery_batches) if recovery_batches is not None else _take(train_loader, recovery.steps)
        if not data:
            raise ValueError("recovery needs recovery_batches or a train_loader")
    stage_steps = [recovery.steps // iterative + (1 if k < recovery.steps % iterative else 0)
                   for k in range(iterative)][::-1]  # the remainder goes to the last stages
    measure = {"params": count_params, "memory": _memory_bytes}.get(budget_kind, count_macs)
    dense_size = measure(decomposed)
    metrics: dict[str, Any] = {}
    report_recovery: dict[str, Any] = {}
    seconds.update({"scoring": 0.0, "fusion": 0.0, "planning": 0.0, "compaction": 0.0, "bn_recalibration": 0.0,
                    "recovery": 0.0, "evaluate": 0.0})
    model, plans, result = decomposed, [], None
    with progress_bar(f"pruning ({method})", total=2 * iterative + 1, enabled=progress) as advance:
        for k in range(iterative):
            # The kept fraction after step k+1 is budget^((k+1)/K), asked of the current model as a fraction of
            # its own size (the planner's budget is relative to the model it is given).
            target = float(budget_value) if k == iterative - 1 else float(budget_value) ** ((k + 1) / iterative)
            value = min(1.0, target * dense_size / measure(model)) if k else target
            request = PlanRequest(
                model=model, batches=batches, tasks=tuple(tasks), budget_kind=budget_kind,
                budget_value=value, options=options or BudgetOptions(), seed=seed,
                base_model_sha256=base_sha256, priorities=dict(priorities or {}),
            )
            result = plan_with(method, request, criterion=criterion, fusion_rule=fusion, normalise=normalise)
            for key, v in result.seconds.items():
                seconds[key] = seconds.get(key, 0.0) + v
            plans.append(result.plan)
            advance(1, f"planned step {k + 1}/{iterative}")
            t = time.perf_counter()
            model = compact_model(model, result.plan)
            seconds["compaction"] += time.perf_counter() - t
            t = time.perf_counter()
            if recalibrate_bn and batches:
                recalibrate_batchnorm(model, batches)
            seconds["bn_recalibration"] += time.perf_counter() - t
            last = k == iterative - 1
            t = time.perf_counter()
            if test_loader is not None and last:
                metrics["dense"] = dense_metrics or evaluate(decomposed, test_loader, list(tasks), eval_batches)
                if recovery.steps > 0:
                    metrics["compact_before_recovery"] = evaluate(model, test_loader, list(tasks), eval_batches)
            seconds["evaluate"] += time.perf_counter() - t
            t = time.perf_counter()
            if stage_steps[k] > 0:
                stage = replace(recovery, steps=stage_steps[k]) if iterative > 1 else recovery
                # one stage: the run's seed (as one shot); stage k of K: its own visit order
                report_recovery = recover(model, decomposed, data, stage, seed=seed if iterative == 1
                                          else seed * 7919 + k, progress=progress)
            seconds["recovery"] += time.perf_counter() - t
            advance(1, f"recovered step {k + 1}/{iterative}")
        compact = model
        compact.eval()
        seconds["prune_total"] = sum(seconds[k] for k in ("scoring", "fusion", "planning", "compaction"))
        plan = plans[0] if iterative == 1 else _compose(plans, decomposed, budget_kind, float(budget_value), method,
                                                          dense_size, measure(compact))
        result = PlanResult(plan, result.seconds, {**result.info, "iterative": iterative,
                                                   "step_plans": [p.plan_hash for p in plans]}
                            if iterative > 1 else result.info)
        advance(1, "evaluated")

    t = time.perf_counter()
    if test_loader is not None:
        metrics["compact"] = evaluate(compact, test_loader, list(tasks), eval_batches)
    seconds["evaluate"] += time.perf_counter() - t

    report = _report(base_model, decomposed, compact, result, metrics, seconds)
    report.update({"tasks": list(tasks), "method": method, "seed": seed, "num_batches": len(batches),
                   "iterative": iterative,
                   "bn_recalibrated": bool(recalibrate_bn and batches),
                   "recovery": {**asdict(recovery), "budget": describe_recovery(recovery),
                                "final_loss": report_recovery.get("loss")},
                   "budget": {"kind": budget_kind, "value": float(budget_value)}})
    return compact, result.plan, report


def _compose(plans: list[PruningPlan], decomposed: MultiTaskModel, budget_kind: str, budget_value: float,
             method: str, dense_size: int, final_size: int) -> PruningPlan:
    """The plan of the decomposed model that keeps what K successive plans (each of the previous compact
    model, whose channels are the kept ones in order) keep."""
    first = plans[0]
    keep = {g: tuple(idx) for g, idx in first.keep.items()}
    for later in plans[1:]:
        keep = {g: tuple(idx[i] for i in later.keep[g]) if g in later.keep else idx for g, idx in keep.items()}
    achieved = {f"{budget_kind}_ratio": final_size / dense_size}
    return PruningPlan(base_model_sha256=first.base_model_sha256, tasks=first.tasks, keep=keep, group_sizes=dict(first.group_sizes), budget_kind=budget_kind,
                       budget_value=budget_value, method=f"{method} (iterative {len(plans)})", achieved=achieved)


def _take(loader: Iterable | None, n: int) -> list:
    if loader is None:
        return []
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def _report(base, decomposed, compact, result, metrics, seconds) -> dict[str, Any]:
    full, dense, small = model_size(base), model_size(decomposed), model_size(compact)
    report: dict[str, Any] = {
        **small,
        "dense": dense,
        "full": full,
        "params_ratio": small["params"] / dense["params"],
        "macs_ratio": small["macs"] / dense["macs"],
        "bytes_ratio": small["bytes"] / dense["bytes"],
        "memory_ratio": small["memory"] / dense["memory"],
        "params_ratio_full": small["params"] / full["params"],
        "macs_ratio_full": small["macs"] / full["macs"],
        "bytes_ratio_full": small["bytes"] / full["bytes"],
        "decomposition": {
            "params_ratio": dense["params"] / full["params"],
            "macs_ratio": dense["macs"] / full["macs"],
            "bytes_ratio": dense["bytes"] / full["bytes"],
            "memory_ratio": dense["memory"] / full["memory"],
        },
        "plan_hash": result.plan.plan_hash,
        "plan_achieved": dict(result.plan.achieved),
        "method_info": dict(result.info),
        "metrics": metrics,
        "seconds": seconds,
    }
    if "dense" in metrics and "compact" in metrics:
        report["delta_m"] = multitask_delta(compact, metrics["compact"], metrics["dense"])
        before = metrics.get("compact_before_recovery", metrics["compact"])
        report["delta_m_before_recovery"] = multitask_delta(compact, before, metrics["dense"])
    return report


__all__ = [
    "RecoveryConfig",
    "Samples",
    "SeedData",
    "describe_recovery",
    "model_size",
    "prune",
    "recover",
    "seed_data",
]
