"""Compare pruning methods on one base model, one dataset and the same budgets, fine-tune and seeds.

Every (seed, budget, method) cell prunes the same decomposed model with the same scoring batches (the
seed shuffles the train split) and the same fine-tune steps, and is evaluated on the same test split.
Outputs, in `out_dir`:

- results.json: {"config": ..., "dense": task metrics, "rows": [{"method", "budget", "seed", "delta_m",
  "params_ratio", "macs_ratio", "metrics": {...}, ...}]}
- results.md: method x budget table of delta_m (mean +- sample std over seeds), then per-task primary
  metric means, then the dense reference;
- delta_m_vs_budget.png: one line per method with std error bars.

By default every pruned model gets its BatchNorm statistics re-estimated on its scoring batches
(`recalibrate_bn`), the same for every method. Structured mode prunes channels to a params/MACs budget;
unstructured mode (`structured=False`) masks the given `sparsity` fractions of all Conv2d/Linear weights
(DiSparse's setting), where `budget` in a row is the sparsity.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from cut.budget import BudgetOptions
from cut.compact import apply_masks, recalibrate_batchnorm, weight_sparsity
from cut.importance import take_batches
from cut.methods import masks_with
from cut.metrics import mean_std
from cut.models import MultiTaskModel, count_params
from cut.pipeline import prune
from cut.progress import progress_bar
from cut.train import evaluate, finetune, make_loader, multitask_delta, primary_metrics


def _datasets(dataset: str | tuple[Dataset, Dataset], dataset_kwargs: Mapping[str, Any], train_samples: int,
              test_samples: int) -> tuple[Dataset, Dataset]:
    if not isinstance(dataset, str):
        return dataset
    from cut.data import get_dataset

    train = get_dataset(dataset, "train", num_samples=train_samples, **dataset_kwargs)
    test = get_dataset(dataset, "test", num_samples=test_samples, **dataset_kwargs)
    return train, test


def run_bench(
    base_model: MultiTaskModel,
    dataset: str | tuple[Dataset, Dataset],
    tasks: list[str],
    budgets: Sequence[float],
    methods: Sequence[str],
    seeds: Sequence[int],
    finetune_steps: int,
    out_dir: str | Path,
    structured: bool = True,
    sparsity: float | Sequence[float] | None = None,
    *,
    budget_kind: str = "params",
    dataset_kwargs: Mapping[str, Any] | None = None,
    train_samples: int = 512,
    test_samples: int = 200,
    batch_size: int = 32,
    num_batches: int = 4,
    eval_batches: int | None = None,
    criterion: str | None = None,
    fusion: str | None = None,
    normalise: str | None = None,
    options: BudgetOptions | None = None,
    finetune_lr: float = 1e-3,
    recalibrate_bn: bool = True,
    base_sha256: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run every (seed, budget, method) cell; write results.json, results.md and the plot; return results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = _datasets(dataset, dataset_kwargs or {}, train_samples, test_samples)
    test_loader = make_loader(test_set, batch_size)
    decomposed = base_model.decompose(list(tasks)).eval()
    dense = evaluate(decomposed, test_loader, list(tasks), eval_batches)
    levels = list(budgets) if structured else _as_list(sparsity if sparsity is not None else 0.9)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with progress_bar("benchmark", total=len(seeds) * len(levels) * len(methods), enabled=progress) as advance:
        for seed in seeds:
            train_loader = make_loader(train_set, batch_size, shuffle=True, seed=seed)
            for level in levels:
                for method in methods:
                    if structured:
                        row = _structured_row(base_model, tasks, budget_kind, level, method, criterion, fusion,
                                              normalise, train_loader, test_loader, num_batches, finetune_steps,
                                              seed, base_sha256, options, eval_batches, dense, finetune_lr,
                                              recalibrate_bn)
                    else:
                        row = _unstructured_row(decomposed, tasks, level, method, train_loader, test_loader,
                                                num_batches, finetune_steps, seed, eval_batches, dense, finetune_lr,
                                                recalibrate_bn)
                    rows.append(row)
                    advance(1, f"{method} @ {level:g} seed {seed}: delta_m={row['delta_m']:+.2f}")
    config = {
        "tasks": list(tasks), "budgets": levels, "budget_kind": budget_kind if structured else "sparsity",
        "methods": list(methods), "seeds": list(seeds), "finetune_steps": finetune_steps,
        "structured": structured, "num_batches": num_batches, "batch_size": batch_size,
        "train_samples": len(train_set), "test_samples": len(test_set), "criterion": criterion, "fusion": fusion,
        "normalise": normalise, "bn_recalibration": recalibrate_bn, "base_sha256": base_sha256,
        "seconds": time.perf_counter() - started,
        "dataset": dataset if isinstance(dataset, str) else type(train_set).__name__,
    }
    results = {"config": config, "dense": dense, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(results_markdown(results, decomposed))
    plot_delta(results, out / "delta_m_vs_budget.png")
    return results


def _as_list(x: float | Sequence[float]) -> list[float]:
    return [float(x)] if isinstance(x, (int, float)) else [float(v) for v in x]


def _structured_row(base_model, tasks, kind, budget, method, criterion, fusion, normalise, train_loader,
                    test_loader, num_batches, finetune_steps, seed, base_sha256, options, eval_batches, dense,
                    finetune_lr, recalibrate_bn) -> dict[str, Any]:
    _, plan, report = prune(
        base_model, list(tasks), kind, budget, method, criterion, fusion, train_loader, test_loader, num_batches,
        finetune_steps, seed, base_sha256, options=options, normalise=normalise, eval_batches=eval_batches,
        dense_metrics=dense, finetune_lr=finetune_lr, recalibrate_bn=recalibrate_bn, progress=False,
    )
    return {
        "method": method, "budget": budget, "seed": seed, "delta_m": report["delta_m"],
        "params_ratio": report["params_ratio"], "macs_ratio": report["macs_ratio"],
        "bytes_ratio": report["bytes_ratio"], "params_ratio_full": report["params_ratio_full"],
        "metrics": report["metrics"]["compact"], "delta_m_before_finetune": report.get("delta_m_before_finetune"),
        "seconds": report["seconds"], "plan_hash": plan.plan_hash, "method_info": report["method_info"],
    }


def _unstructured_row(decomposed, tasks, sparsity, method, train_loader, test_loader, num_batches,
                      finetune_steps, seed, eval_batches, dense, finetune_lr, recalibrate_bn) -> dict[str, Any]:
    t = time.perf_counter()
    batches = take_batches(train_loader, num_batches)
    model = copy.deepcopy(decomposed)
    masks = masks_with(method, model, batches, list(tasks), sparsity, seed)
    handles = apply_masks(model, masks)
    pruning_seconds = time.perf_counter() - t
    if recalibrate_bn:
        recalibrate_batchnorm(model, batches)
    if finetune_steps > 0:
        finetune(model, decomposed, train_loader, finetune_steps, lr=finetune_lr, progress=False)
    for h in handles:
        h.remove()
    metrics = evaluate(model, test_loader, list(tasks), eval_batches)
    zeros = sum(int((~m).sum()) for m in masks.values())
    return {
        "method": method, "budget": sparsity, "seed": seed, "sparsity": weight_sparsity(model),
        "delta_m": multitask_delta(model, metrics, dense),
        "params_ratio": 1 - zeros / count_params(decomposed), "macs_ratio": 1.0,
        "metrics": metrics, "seconds": {"prune_total": pruning_seconds},
    }


def _cells(rows: list[dict]) -> tuple[list[str], list[float], dict[tuple[str, float], list[dict]]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["budget"]), []).append(r)
    return methods, budgets, cells


def results_markdown(results: Mapping[str, Any], model: MultiTaskModel) -> str:
    cfg, rows, dense = results["config"], results["rows"], results["dense"]
    methods, budgets, cells = _cells(rows)
    label = "sparsity" if not cfg["structured"] else f"{cfg['budget_kind']} budget"
    lines = [
        f"# delta_m (%) by method and {label}",
        "",
        f"tasks {','.join(cfg['tasks'])}; seeds {cfg['seeds']}; fine-tune steps {cfg['finetune_steps']}; "
        f"{cfg['num_batches']} scoring batches of {cfg['batch_size']}; test samples {cfg['test_samples']}.",
        "Mean +- sample std over seeds; 0 = dense decomposed model, negative = worse.",
        "",
        "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for m in methods:
        cols = []
        for b in budgets:
            vals = [r["delta_m"] for r in cells.get((m, b), [])]
            mean, std = mean_std(vals)
            cols.append(f"{mean:+.2f} ± {std:.2f}" if vals else "-")
        lines.append(f"| {m} | " + " | ".join(cols) + " |")
    tasks = cfg["tasks"]
    lines += ["", "## Per-task primary metrics (mean over seeds)", "",
              "| method | budget | " + " | ".join(f"{t} {model.config.task(t).primary_metric}" for t in tasks)
              + " | params ratio | MACs ratio |",
              "|---|---|" + "---|" * (len(tasks) + 2)]
    dense_primary = primary_metrics(model, dense)
    lines.append("| dense | 1 | " + " | ".join(f"{dense_primary[t]:.3f}" for t in tasks) + " | 1.000 | 1.000 |")
    for m in methods:
        for b in budgets:
            group = cells.get((m, b), [])
            if not group:
                continue
            vals = [mean_std([primary_metrics(model, r["metrics"])[t] for r in group])[0] for t in tasks]
            pr = mean_std([r["params_ratio"] for r in group])[0]
            mr = mean_std([r["macs_ratio"] for r in group])[0]
            lines.append(f"| {m} | {b:g} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {pr:.3f} | {mr:.3f} |")
    return "\n".join(lines) + "\n"


def plot_delta(results: Mapping[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, budgets, cells = _cells(results["rows"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        xs, ys, es = [], [], []
        for b in budgets:
            vals = [r["delta_m"] for r in cells.get((m, b), [])]
            if vals:
                mean, std = mean_std(vals)
                xs.append(b)
                ys.append(mean)
                es.append(std)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    structured = results["config"]["structured"]
    ax.set_xlabel(f"{results['config']['budget_kind']} budget (fraction kept)" if structured else "sparsity")
    ax.set_ylabel("delta_m (%)")
    ax.set_title(f"tasks {','.join(results['config']['tasks'])}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["plot_delta", "results_markdown", "run_bench"]
