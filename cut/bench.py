"""Compare pruning methods on one base model, one dataset, the same budgets, data, recovery and seeds.

The rules are EVALUATION.md's. Per seed, every method and budget gets byte-identical data: the train and
test splits are materialised once as tensors (`cut.pipeline.Samples`), and each seed draws, from a
generator seeded by the seed alone, the scoring batches (which also re-estimate BatchNorm statistics)
and the recovery batches (`cut.pipeline.seed_data`); every cell is evaluated on the same test batches.
No cell reads a shared iterator, so the order of `methods` (or of budgets) changes no result bit.
Recovery is the same stage with the same budget for every method (`cut.pipeline.recover`).
`iterative` = K > 1 runs every method in K pruning steps with re-scoring and a K-th of the recovery
between them (`cut.pipeline.prune`); the tables say so.

Outputs, in `out_dir`:

- results.json: {"config": ..., "dense": task metrics, "rows": [{"method", "budget", "seed", "delta_m",
  "delta_m_before_recovery", "params_ratio", "macs_ratio", "metrics": {...}, ...}]}
- results.md: method x budget tables of delta_m (mean +- sample std over seeds) after and before
  recovery, each with the recovery budget and, per budget, `cut` against the best other method: the
  paired difference over seeds with its 95% t-interval and "better" / "worse" when the interval excludes
  0, else "level"; then per-task primary metrics, reached ratios and the dense reference;
- delta_m_vs_budget.png: one line per method with std error bars (after recovery).

Structured mode prunes channels to a params/MACs budget; unstructured mode (`structured=False`) masks
the given `sparsity` fractions of all Conv2d/Linear weights (DiSparse's setting), where `budget` in a
row is the sparsity.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from cut.budget import BudgetOptions
from cut.compact import apply_masks, recalibrate_batchnorm, weight_sparsity
from cut.methods import BASELINES, METHODS, canonical, masks_with
from cut.metrics import mean_std
from cut.models import MultiTaskModel, count_params
from cut.pipeline import RecoveryConfig, Samples, SeedData, describe_recovery, prune, recover, seed_data
from cut.progress import progress_bar
from cut.train import evaluate, multitask_delta, primary_metrics

EVAL_BATCH = 64


def _datasets(dataset: str | tuple[Dataset, Dataset], dataset_kwargs: Mapping[str, Any], train_samples: int,
              test_samples: int) -> tuple[Dataset, Dataset]:
    if not isinstance(dataset, str):
        return dataset
    from cut.data import get_dataset

    train = get_dataset(dataset, "train", num_samples=train_samples, **dataset_kwargs)
    test = get_dataset(dataset, "test", num_samples=test_samples, **dataset_kwargs)
    return train, test


def expand_methods(names: Sequence[str]) -> list[str]:
    """Canonical method names; `tp-grid` stands for every Torch-Pruning grid point."""
    out: list[str] = []
    for name in names:
        new = [m for m, spec in METHODS.items() if spec.kind == "tp-grid"] if name == "tp-grid" else [canonical(name)]
        out += [m for m in new if m not in out]
    return out


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
    finetune_lr: float | None = None,
    recovery: RecoveryConfig | None = None,
    recalibrate_bn: bool = True,
    base_sha256: str = "",
    workers: int = 1,
    progress: bool = True,
    iterative: int = 1,
) -> dict[str, Any]:
    """Run every (seed, budget, method) cell; write results.json, results.md and the plot; return results.

    `recovery` (else `finetune_steps` steps of batch `batch_size`, at `finetune_lr` if given) is every
    method's recovery stage (`cut.recovery`). `workers` > 1 runs cells in that many forked processes (one
    torch thread each); every cell depends only on its (seed, budget, method), so the rows are the same bits
    as with one worker.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = expand_methods(methods)
    if not isinstance(iterative, int) or iterative < 1:
        raise ValueError(f"iterative must be a whole number of pruning steps >= 1, got {iterative!r}")
    if iterative > 1 and not structured:
        raise ValueError("iterative pruning is for structured mode only (unstructured masks are one shot)")
    if recovery is None:
        recovery = RecoveryConfig(steps=finetune_steps, batch_size=batch_size,
                                  **({"lr": finetune_lr} if finetune_lr is not None else {}))
    load_start = _loadavg()
    started = time.perf_counter()
    train_set, test_set = _datasets(dataset, dataset_kwargs or {}, train_samples, test_samples)
    train, test = Samples.from_dataset(train_set), Samples.from_dataset(test_set)
    test_batches = test.batches(EVAL_BATCH)
    data_seconds = time.perf_counter() - started
    decomposed = base_model.decompose(list(tasks)).eval()
    dense = evaluate(decomposed, test_batches, list(tasks), eval_batches)
    levels = list(budgets) if structured else _as_list(sparsity if sparsity is not None else 0.9)
    cells = [(seed, level, method) for seed in seeds for level in levels for method in methods]
    context = _Context(base_model, decomposed, list(tasks), structured, budget_kind, criterion, fusion, normalise,
                       options, train, test_batches, batch_size, num_batches, recovery, recalibrate_bn, base_sha256,
                       eval_batches, dense, iterative)
    rows = _run_cells(cells, context, workers, progress)
    config = {
        "tasks": list(tasks), "budgets": levels, "budget_kind": budget_kind if structured else "sparsity",
        "methods": methods, "seeds": list(seeds), "structured": structured, "num_batches": num_batches,
        "batch_size": batch_size, "train_samples": len(train), "test_samples": len(test),
        "recovery": {**_asdict(recovery), "budget": describe_recovery(recovery)}, "criterion": criterion, "fusion": fusion,
        "normalise": normalise, "bn_recalibration": recalibrate_bn, "base_sha256": base_sha256,
        "seconds": time.perf_counter() - started, "data_seconds": data_seconds, "workers": workers,
        "iterative": iterative,
        "dataset": dataset if isinstance(dataset, str) else type(train_set).__name__,
        "machine": {"cores": os.cpu_count(), "cpu": _cpu_model(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load_start, "loadavg_end": _loadavg(), "platform": platform.platform()},
    }
    results = {"config": config, "dense": dense, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(results_markdown(results, decomposed))
    plot_delta(results, out / "delta_m_vs_budget.png")
    return results


@dataclass
class _Context:
    """Everything a cell needs besides its (seed, budget, method)."""

    base_model: MultiTaskModel
    decomposed: MultiTaskModel
    tasks: list[str]
    structured: bool
    budget_kind: str
    criterion: str | None
    fusion: str | None
    normalise: str | None
    options: BudgetOptions | None
    train: Samples
    test_batches: list
    batch_size: int
    num_batches: int
    recovery: RecoveryConfig
    recalibrate_bn: bool
    base_sha256: str
    eval_batches: int | None
    dense: dict
    iterative: int = 1
    seed_cache: dict = field(default_factory=dict)

    def data(self, seed: int) -> SeedData:
        if seed not in self.seed_cache:
            self.seed_cache = {seed: seed_data(self.train, seed, self.batch_size, self.num_batches, self.recovery)}
        return self.seed_cache[seed]


_WORKER_CONTEXT: _Context | None = None  # set before forking workers, read by _cell in each worker


def _cell(cell: tuple[int, int, float, str]) -> tuple[int, dict[str, Any]]:
    index, seed, level, method = cell
    c = _WORKER_CONTEXT
    data = c.data(seed)
    torch.manual_seed(seed)
    if c.structured:
        row = _structured_row(c.base_model, c.tasks, c.budget_kind, level, method, c.criterion, c.fusion, c.normalise,
                              data, c.test_batches, seed, c.base_sha256, c.options, c.eval_batches, c.dense,
                              c.recovery, c.recalibrate_bn, c.iterative)
    else:
        row = _unstructured_row(c.decomposed, c.tasks, level, method, data, c.test_batches, seed, c.eval_batches,
                                c.dense, c.recovery, c.recalibrate_bn)
    return index, row


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_cells(cells: list[tuple[int, float, str]], context: _Context, workers: int, progress: bool) -> list[dict]:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = context
    indexed = [(i, *cell) for i, cell in enumerate(cells)]
    rows: list[dict[str, Any] | None] = [None] * len(cells)
    try:
        with progress_bar("benchmark", total=len(cells), enabled=progress) as advance:
            if workers <= 1:
                results = map(_cell, indexed)
                pool = None
            else:
                pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
                results = pool.imap_unordered(_cell, indexed)
            try:
                for i, row in results:
                    rows[i] = row
                    advance(1, f"{row['method']} @ {row['budget']:g} seed {row['seed']}: delta_m={row['delta_m']:+.2f}")
            except BaseException:
                if pool is not None:
                    pool.terminate()
                raise
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        _WORKER_CONTEXT = None
    return rows


def _asdict(recovery: Any) -> dict:
    return dataclasses.asdict(recovery) if dataclasses.is_dataclass(recovery) else dict(vars(recovery))


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _as_list(x: float | Sequence[float]) -> list[float]:
    return [float(x)] if isinstance(x, (int, float)) else [float(v) for v in x]


def _structured_row(base_model, tasks, kind, budget, method, criterion, fusion, normalise, data: SeedData,
                    test_batches, seed, base_sha256, options, eval_batches, dense, recovery,
                    recalibrate_bn, iterative=1) -> dict[str, Any]:
    overrides = METHODS[method].recipe is not None
    _, plan, report = prune(
        base_model, list(tasks), kind, budget, method, criterion if overrides else None,
        fusion if overrides else None, None, test_batches, len(data.scoring), 0, seed, base_sha256,
        options=options, normalise=normalise if overrides else None, eval_batches=eval_batches,
        dense_metrics=dense, recalibrate_bn=recalibrate_bn, recovery=recovery, scoring_batches=data.scoring,
        recovery_batches=data.recovery, progress=False, iterative=iterative,
    )
    return {
        "method": method, "budget": budget, "seed": seed, "delta_m": report["delta_m"],
        "delta_m_before_recovery": report["delta_m_before_recovery"],
        "params_ratio": report["params_ratio"], "macs_ratio": report["macs_ratio"],
        "bytes_ratio": report["bytes_ratio"], "params_ratio_full": report["params_ratio_full"],
        "metrics": report["metrics"]["compact"],
        "metrics_before_recovery": report["metrics"].get("compact_before_recovery", report["metrics"]["compact"]),
        "seconds": report["seconds"], "plan_hash": plan.plan_hash, "method_info": report["method_info"],
    }


def _unstructured_row(decomposed, tasks, sparsity, method, data: SeedData, test_batches, seed, eval_batches, dense,
                      recovery, recalibrate_bn) -> dict[str, Any]:
    t = time.perf_counter()
    model = copy.deepcopy(decomposed)
    masks = masks_with(method, model, data.scoring, list(tasks), sparsity, seed)
    handles = apply_masks(model, masks)
    pruning_seconds = time.perf_counter() - t
    if recalibrate_bn:
        recalibrate_batchnorm(model, data.scoring)
    before = evaluate(model, test_batches, list(tasks), eval_batches)
    if recovery.steps > 0:
        recover(model, decomposed, data.recovery, recovery, seed=seed)
    for h in handles:
        h.remove()
    metrics = evaluate(model, test_batches, list(tasks), eval_batches) if recovery.steps > 0 else before
    zeros = sum(int((~m).sum()) for m in masks.values())
    return {
        "method": method, "budget": sparsity, "seed": seed, "sparsity": weight_sparsity(model),
        "delta_m": multitask_delta(model, metrics, dense),
        "delta_m_before_recovery": multitask_delta(model, before, dense),
        "params_ratio": 1 - zeros / count_params(decomposed), "macs_ratio": 1.0,
        "metrics": metrics, "metrics_before_recovery": before, "seconds": {"prune_total": pruning_seconds},
    }


# ----------------------------------------------------------------------------------------------------
# Statistics

# Two-sided 95% quantiles of Student's t (0.975 quantile) by degrees of freedom.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """0.975 quantile of Student's t with `df` degrees of freedom (table; conservative between rows)."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 paired values")
    return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.960


def paired_interval(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any] | None:
    """Paired difference a - b over the seeds both have: mean, 95% t-interval, verdict; None if < 2 pairs.

    The verdict is "better" when the interval lies above 0, "worse" below 0, else "level".
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(d)
    half = t975(len(d) - 1) * std / math.sqrt(len(d))
    lo, hi = mean - half, mean + half
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "level"
    return {"n": len(d), "mean": mean, "low": lo, "high": hi, "verdict": verdict}


def _cells(rows: list[dict]) -> tuple[list[str], list[float], dict[tuple[str, float], list[dict]]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["budget"]), []).append(r)
    return methods, budgets, cells


def _kind(method: str) -> str:
    return METHODS[method].kind if method in METHODS else "baseline"


def comparisons(results: Mapping[str, Any], key: str = "delta_m", reference: str = "cut") -> dict[float, dict]:
    """budget -> {"other": best other method by mean `key`, "mean_other", "mean_ref", paired interval}."""
    methods, budgets, cells = _cells(results["rows"])
    others = [m for m in methods if m != reference and _kind(m) in ("baseline", "tp-grid")]
    out: dict[float, dict] = {}
    if reference not in methods or not others:
        return out
    for b in budgets:
        ref = {r["seed"]: r[key] for r in cells.get((reference, b), [])}
        means = {m: mean_std([r[key] for r in cells[(m, b)]])[0] for m in others if cells.get((m, b))}
        if not ref or not means:
            continue
        best = max(means, key=means.get)
        other = {r["seed"]: r[key] for r in cells[(best, b)]}
        out[b] = {"other": best, "mean_other": means[best], "mean_ref": mean_std(list(ref.values()))[0],
                  "paired": paired_interval(ref, other)}
    return out


# ----------------------------------------------------------------------------------------------------
# Report


def _delta_table(results: Mapping[str, Any], key: str, title: str) -> list[str]:
    cfg = results["config"]
    methods, budgets, cells = _cells(results["rows"])
    label = "sparsity" if not cfg["structured"] else f"{cfg['budget_kind']} budget"
    rec = cfg["recovery"]
    lines = [
        f"## {title}: delta_m (%) by method and {label}",
        "",
        f"Recovery: {rec['budget'] if key == 'delta_m' else 'none (measured before the recovery stage)'}. "
        f"{_iterative_note(cfg, key)}"
        f"Tasks {','.join(cfg['tasks'])}; seeds {cfg['seeds']}; {cfg['num_batches']} scoring batches of "
        f"{cfg['batch_size']} (also BatchNorm re-estimation); {cfg['test_samples']} test samples; same data "
        "for every method.",
        "Mean ± sample std over seeds; 0 = dense decomposed model, negative = worse.",
        "",
        "| method | kind | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for m in methods:
        cols = []
        for b in budgets:
            vals = [r[key] for r in cells.get((m, b), [])]
            mean, std = mean_std(vals)
            cols.append(f"{mean:+.2f} ± {std:.2f}" if vals else "-")
        lines.append(f"| {m} | {_kind(m)} | " + " | ".join(cols) + " |")
    comp = comparisons(results, key)
    if comp:
        lines += ["", "cut against the best other method at each budget (paired over seeds, 95% t-interval):", "",
                  "| budget | best other | cut | other | cut - other | 95% interval | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for b, c in comp.items():
            p = c["paired"]
            interval = f"[{p['low']:+.2f}, {p['high']:+.2f}]" if p else "-"
            lines.append(f"| {b:g} | {c['other']} | {c['mean_ref']:+.2f} | {c['mean_other']:+.2f} | "
                         f"{(p['mean'] if p else c['mean_ref'] - c['mean_other']):+.2f} | {interval} | "
                         f"{p['verdict'] if p else 'n/a (one seed)'} |")
    return lines


def _iterative_note(cfg: Mapping[str, Any], key: str) -> str:
    k = cfg.get("iterative", 1)
    if k <= 1:
        return ""
    if key == "delta_m":
        return f"Iterative: {k} pruning steps, each re-scored, the recovery split over them (same total). "
    return f"Iterative: {k} pruning steps; measured after the last one, before the last recovery stage. "


def results_markdown(results: Mapping[str, Any], model: MultiTaskModel) -> str:
    cfg, rows, dense = results["config"], results["rows"], results["dense"]
    methods, budgets, cells = _cells(rows)
    machine = cfg.get("machine", {})
    lines = [f"# Pruning methods compared ({cfg['dataset']}, tasks {','.join(cfg['tasks'])})", "",
             f"Recovery budget for every method: {cfg['recovery']['budget']}"
             + (f", iterative pruning in {cfg['iterative']} steps" if cfg.get("iterative", 1) > 1 else "")
             + f". Wall time {cfg['seconds']:.0f} s on "
             f"{machine.get('cores', '?')} cores ({machine.get('cpu', '?')}), load average "
             f"{machine.get('loadavg_start')} at start, {machine.get('loadavg_end')} at end.", ""]
    lines += _delta_table(results, "delta_m", "After recovery")
    if cfg["recovery"]["steps"] > 0:
        lines += [""] + _delta_table(results, "delta_m_before_recovery", "Before recovery")
    tasks = cfg["tasks"]
    lines += ["", f"## Per-task primary metrics after recovery (mean over seeds; recovery: {cfg['recovery']['budget']})",
              "",
              "| method | budget | " + " | ".join(f"{t} {model.config.task(t).primary_metric}" for t in tasks)
              + " | params ratio | MACs ratio | prune s | recovery s |",
              "|---|---|" + "---|" * (len(tasks) + 4)]
    dense_primary = primary_metrics(model, dense)
    lines.append("| dense | 1 | " + " | ".join(f"{dense_primary[t]:.3f}" for t in tasks) + " | 1.000 | 1.000 | - | - |")
    for m in methods:
        for b in budgets:
            group = cells.get((m, b), [])
            if not group:
                continue
            vals = [mean_std([primary_metrics(model, r["metrics"])[t] for r in group])[0] for t in tasks]
            pr = mean_std([r["params_ratio"] for r in group])[0]
            mr = mean_std([r["macs_ratio"] for r in group])[0]
            ps = mean_std([r["seconds"].get("prune_total", 0.0) for r in group])[0]
            rs = mean_std([r["seconds"].get("recovery", 0.0) for r in group])[0]
            lines.append(f"| {m} | {b:g} | " + " | ".join(f"{v:.3f}" for v in vals)
                         + f" | {pr:.3f} | {mr:.3f} | {ps:.1f} | {rs:.1f} |")
    lines += ["", "Methods: " + "; ".join(f"`{m}`: {METHODS[m].summary}" for m in methods if m in METHODS) + "."]
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
    ax.set_title(f"tasks {','.join(results['config']['tasks'])}; recovery {results['config']['recovery']['steps']} steps")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["BASELINES", "comparisons", "expand_methods", "paired_interval", "plot_delta", "results_markdown",
           "run_bench", "t975"]
