"""One CUT pruning run, top to bottom: decompose, score, fuse, plan, compact, fine-tune, evaluate.

    decomposed = base.decompose(tasks)                       # step 1: keep the selected heads
    plan       = methods.plan_with(method, request)          # steps 2-3 + budget: scores -> fused -> plan
    compact    = compact.compact_model(decomposed, plan)     # step 4: physically smaller dense model
    train.finetune(compact, teacher=decomposed, ...)         # optional recovery, distilled from dense

The report says what was reached (params, MACs, bytes; each as a ratio to the dense decomposed model and
to the full multi-task model), what decomposition alone saved, per-task metrics before (dense decomposed)
and after, delta_m (EVALUATION.md), and where the time went. Data loading is timed apart from pruning.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from torch.utils.data import DataLoader

from cut.budget import BudgetOptions, check_budget
from cut.checkpoint import state_dict_bytes
from cut.compact import compact_model, recalibrate_batchnorm
from cut.methods import PlanRequest, plan_with
from cut.models import MultiTaskModel, count_macs, count_params
from cut.plan import PruningPlan
from cut.progress import progress_bar
from cut.train import evaluate, finetune, multitask_delta


def model_size(model: MultiTaskModel) -> dict[str, int]:
    """Parameters, MACs (one image at the config's input size) and serialised state_dict bytes."""
    return {"params": count_params(model), "macs": count_macs(model), "bytes": len(state_dict_bytes(model))}


def prune(
    base_model: MultiTaskModel,
    tasks: list[str],
    budget_kind: str,
    budget_value: float,
    method: str = "cut",
    criterion: str | None = None,
    fusion: str | None = None,
    train_loader: Iterable | None = None,
    test_loader: DataLoader | None = None,
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
    finetune_lr: float = 1e-3,
    recalibrate_bn: bool = True,
    progress: bool = True,
) -> tuple[MultiTaskModel, PruningPlan, dict[str, Any]]:
    """Prune `base_model` for `tasks` to the budget; returns (compact model, plan, report).

    `dense_metrics` (the decomposed model's metrics on `test_loader`) may be passed to skip evaluating
    the dense model again when several methods share one base model. With `recalibrate_bn` the compact
    model's BatchNorm statistics are re-estimated on the scoring batches (no weight changes): pruning
    shifts the statistics downstream layers normalise with, and without it a one-shot compact model is
    judged mostly by that shift.
    """
    check_budget(budget_kind, budget_value)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    decomposed = base_model.decompose(list(tasks))
    decomposed.eval()
    seconds["decompose"] = time.perf_counter() - t

    t = time.perf_counter()
    batches = _take(train_loader, num_batches)
    seconds["data"] = time.perf_counter() - t

    with progress_bar(f"pruning ({method})", total=3, enabled=progress) as advance:
        request = PlanRequest(
            model=decomposed, batches=batches, tasks=tuple(tasks), budget_kind=budget_kind,
            budget_value=float(budget_value), options=options or BudgetOptions(), seed=seed,
            base_model_sha256=base_sha256, priorities=dict(priorities or {}),
        )
        result = plan_with(method, request, criterion=criterion, fusion_rule=fusion, normalise=normalise)
        seconds.update(result.seconds)
        advance(1, "planned")
        t = time.perf_counter()
        compact = compact_model(decomposed, result.plan)
        seconds["compaction"] = time.perf_counter() - t
        seconds["prune_total"] = sum(seconds[k] for k in ("scoring", "fusion", "planning", "compaction"))
        t = time.perf_counter()
        if recalibrate_bn and batches:
            recalibrate_batchnorm(compact, batches)
        seconds["bn_recalibration"] = time.perf_counter() - t
        advance(1, "compacted")

        t = time.perf_counter()
        metrics: dict[str, Any] = {}
        if test_loader is not None:
            metrics["dense"] = dense_metrics or evaluate(decomposed, test_loader, list(tasks), eval_batches)
            if finetune_steps > 0:
                metrics["compact_before_finetune"] = evaluate(compact, test_loader, list(tasks), eval_batches)
        seconds["evaluate"] = time.perf_counter() - t
        advance(1, "evaluated dense")

    t = time.perf_counter()
    if finetune_steps > 0:
        if train_loader is None:
            raise ValueError("fine-tuning needs a train_loader")
        finetune(compact, decomposed, train_loader, finetune_steps, lr=finetune_lr, progress=progress)
    compact.eval()
    seconds["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    if test_loader is not None:
        metrics["compact"] = evaluate(compact, test_loader, list(tasks), eval_batches)
    seconds["evaluate"] += time.perf_counter() - t

    report = _report(base_model, decomposed, compact, result, metrics, seconds)
    report.update({"tasks": list(tasks), "method": method, "seed": seed, "num_batches": len(batches),
                   "bn_recalibrated": bool(recalibrate_bn and batches),
                   "finetune_steps": finetune_steps, "budget": {"kind": budget_kind, "value": float(budget_value)}})
    return compact, result.plan, report


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
        "params_ratio_full": small["params"] / full["params"],
        "macs_ratio_full": small["macs"] / full["macs"],
        "bytes_ratio_full": small["bytes"] / full["bytes"],
        "decomposition": {
            "params_ratio": dense["params"] / full["params"],
            "macs_ratio": dense["macs"] / full["macs"],
            "bytes_ratio": dense["bytes"] / full["bytes"],
        },
        "plan_hash": result.plan.plan_hash,
        "plan_achieved": dict(result.plan.achieved),
        "method_info": dict(result.info),
        "metrics": metrics,
        "seconds": seconds,
    }
    if "dense" in metrics and "compact" in metrics:
        report["delta_m"] = multitask_delta(compact, metrics["compact"], metrics["dense"])
        if "compact_before_finetune" in metrics:
            report["delta_m_before_finetune"] = multitask_delta(
                compact, metrics["compact_before_finetune"], metrics["dense"])
    return report


__all__ = ["model_size", "prune"]
