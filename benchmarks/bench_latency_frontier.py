"""What a higher speed-up / MAC reduction costs in accuracy under a latency budget on this machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_latency_frontier.py [--model runs/pretrained-scenes]
        [--budget 0.5] [--weights 0.3,1,3,inf] [--seeds 0,1,2] [--recovery-steps 100] [--cached-table]

Speed-up / MAC reduction is the plan's MACs per second over the dense model's: a plan scores high when it
keeps the layers that run fast per MAC. The product's latency planner (`cut.planner.plan_from_scores`,
`latency=f`) keeps the channels that matter most per microsecond and does not look at MACs. To see how far
the ratio can go, and at what cost, this benchmark plans the same budget with a value that adds MACs to
importance: kept value = (kept fused score / total fused score) + w * (kept MACs / dense MACs), planned
against the same latency table (remove the allowed step losing the least value per ns saved until the
budget holds, then add back the step gaining the most value per ns while it holds). w = inf keeps the
most MACs the budget allows, whatever they score: the ceiling of the ratio for channel pruning here.

Every plan gets the same scoring and recovery batches, BatchNorm re-estimation and recovery recipe as
`cut.pipeline.prune` (compact -> recalibrate -> distil from the dense model), per seed. Every distinct plan of
every seed and the dense model are exported to ONNX and timed in one interleaved run on --threads threads
(default 1), batch 1, right after the latency table is measured. Writes benchmarks/results/latency_frontier.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py
from model_data import load_model_and_data  # benchmarks/model_data.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mac_weighted_counts(cost, allowed: dict[str, np.ndarray], fused: dict[str, np.ndarray], target_ns: float,
                        weight: float) -> np.ndarray:
    """Kept counts per group maximising importance share + weight * MAC share within `target_ns`."""
    names = list(cost.group_names)
    cum = {g: np.concatenate([[0.0], np.cumsum(np.sort(np.asarray(fused[g], float))[::-1])]) for g in names}
    total_score = sum(c[-1] for c in cum.values())
    dense_macs = cost.base.evaluate(cost.group_sizes.astype(float))[1]

    def value(kept: np.ndarray) -> float:
        macs = cost.base.evaluate(kept)[1] / dense_macs
        if math.isinf(weight):
            return macs
        return sum(cum[g][int(kept[j])] for j, g in enumerate(names)) / total_score + weight * macs

    def steps(kept: np.ndarray, down: bool):
        for j, g in enumerate(names):
            a = allowed[g]
            i = int(np.searchsorted(a, kept[j])) - 1 if down else int(np.searchsorted(a, kept[j], side="right"))
            if 0 <= i < len(a):
                trial = kept.copy()
                trial[j] = a[i]
                yield trial, cost.cost("latency", trial)

    kept = cost.group_sizes.astype(float)
    now = cost.cost("latency", kept)
    while now > target_ns:
        v = value(kept)
        saving = [((v - value(t)) / (now - ns), ns, t) for t, ns in steps(kept, True) if ns < now]
        if not saving:
            raise ValueError(f"latency budget of {target_ns / 1e6:.3f} ms unreachable")
        _, now, kept = min(saving, key=lambda x: x[0])
    while True:
        v = value(kept)
        fits = [((value(t) - v) / max(ns - now, 1.0), ns, t) for t, ns in steps(kept, False) if ns <= target_ns]
        if not fits:
            return kept
        _, now, kept = max(fits, key=lambda x: x[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/pretrained-scenes"))
    p.add_argument("--tasks", default="seg,depth")
    p.add_argument("--budget", type=float, default=0.5, help="latency budget, a fraction of the dense time")
    p.add_argument("--weights", default="0.3,1,3,inf", help="MAC weights w of the traded plans")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--recovery-batch-size", type=int, default=32)
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--test-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    p.add_argument("--runs", type=int, default=10, help="timed runs per model per round")
    p.add_argument("--cached-table", action="store_true", help="use a cached latency table if there is one")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_frontier"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cut import fusion
    from cut.budget import BudgetOptions, cost_for, group_allowed
    from cut.compact import compact_model, recalibrate_batchnorm
    from cut.export import export_onnx
    from cut.groups import analyse
    from cut.importance import score_tasks
    from cut.latency import interleaved_ms, table_for
    from cut.pipeline import RecoveryConfig, seed_data
    from cut.planner import plan_from_counts, plan_from_scores
    from cut.recovery import recover
    from cut.train import evaluate, multitask_delta

    start = time.perf_counter()
    base, card, train, test = load_model_and_data(args.model, args.train_samples, args.test_samples)
    tasks = args.tasks.split(",")
    weights = [float(w) for w in args.weights.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    test_batches = test.batches(64)
    recovery = RecoveryConfig(steps=args.recovery_steps, batch_size=args.recovery_batch_size)
    dense = base.decompose(tasks).eval()
    table = table_for(dense, card["weights_sha256"], threads=args.threads, refresh=not args.cached_table)
    analysis = analyse(dense)
    options = BudgetOptions(latency=table)
    cost, planned_options = cost_for(analysis, "latency", options)
    allowed = group_allowed(cost, planned_options)
    target_ns = args.budget * cost.dense("latency")
    # Pass 1, right after the table: every seed's plans, and one interleaved timing of every distinct
    # architecture beside the dense model (a shared machine's load drifts over minutes; recovery does not
    # change a model's architecture, so its time is known before it is recovered).
    rows, seed_inputs = [], {}
    for seed in seeds:
        data = seed_data(train, seed, 32, 4, recovery)
        per_task = score_tasks(dense, data.scoring, tasks, "fisher", len(data.scoring), seed)
        fused = fusion.fuse(dict(per_task), rule="weighted", normalisation=fusion.DEFAULT_NORMALISE)
        seed_inputs[seed] = data
        rows.append({"seed": seed, "plan": "latency planner", "weight": 0.0,
                     "_plan": plan_from_scores(per_task, analysis, "latency", args.budget, options=options,
                                               method="cut")})
        for w in weights:
            kept = mac_weighted_counts(cost, allowed, fused, target_ns, w)
            counts = {g: int(k) for g, k in zip(cost.group_names, kept, strict=True)}
            rows.append({"seed": seed, "plan": f"w={w:g}", "weight": w,
                         "_plan": plan_from_counts(fused, counts, analysis, "latency", args.budget)})
    shapes = list(dict.fromkeys(tuple(len(k) for k in r["_plan"].keep.values()) for r in rows))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "dense.onnx"]
        export_onnx(dense, paths[0])
        for i, shape in enumerate(shapes):
            plan = next(r["_plan"] for r in rows if tuple(len(k) for k in r["_plan"].keep.values()) == shape)
            paths.append(Path(tmp) / f"m{i}.onnx")
            export_onnx(compact_model(dense, plan).eval(), paths[-1])
        times = interleaved_ms(paths, args.threads, rounds=args.rounds, runs=args.runs)
    dense_ms, shape_ms = times[0], dict(zip(shapes, times[1:], strict=True))
    print(f"timed {len(shapes)} distinct plans beside the dense model ({dense_ms:.3f} ms)", file=sys.stderr)
    dense_macs = cost.base.evaluate(cost.group_sizes.astype(float))[1]
    dense_metrics = evaluate(dense, test_batches, tasks)
    for row in rows:  # pass 2: recovery and evaluation, each plan as cut.pipeline.prune would
        t0 = time.perf_counter()
        plan, data = row.pop("_plan"), seed_inputs[row["seed"]]
        kept = cost.counts_vector({g: len(k) for g, k in plan.keep.items()})
        ms = shape_ms[tuple(len(k) for k in plan.keep.values())]
        macs_ratio = cost.base.evaluate(kept)[1] / dense_macs
        model = compact_model(dense, plan).eval()
        recalibrate_batchnorm(model, data.scoring)  # as cut.pipeline.prune: compact, re-estimate, recover
        before = multitask_delta(dense, evaluate(model, test_batches, tasks), dense_metrics)
        recover(model, dense, data.recovery, recovery, seed=row["seed"], progress=False)
        after = multitask_delta(dense, evaluate(model, test_batches, tasks), dense_metrics)
        row.update(macs_ratio=macs_ratio, predicted_fraction=cost.predict_ms(kept) / cost.predict_ms(cost.group_sizes),
                   measured_ms=ms, measured_fraction=ms / dense_ms, speedup_per_mac_reduction=dense_ms / ms * macs_ratio,
                   delta_m_before_recovery=before, delta_m=after, kept={g: len(k) for g, k in plan.keep.items()})
        print(f"seed {row['seed']} {row['plan']}: measured {row['measured_fraction']:.3f} of dense (predicted "
              f"{row['predicted_fraction']:.3f}), MACs {macs_ratio:.3f}, ratio {row['speedup_per_mac_reduction']:.3f}, "
              f"delta_m {after:.2f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    summary = {"date": date.today().isoformat(), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
               "load_1min": os.getloadavg()[0], "model": str(args.model), "weights_sha256": card["weights_sha256"][:12],
               "tasks": tasks, "budget": args.budget, "input_size": list(base.config.input_size),
               "threads": args.threads, "recovery": recovery.budget(), "round_to": table.round_to,
               "dense_ms": dense_ms, "table": {"dense_ms": table.dense_ms, "calibration": table.calibration},
               "timing": f"{args.rounds} interleaved rounds x {args.runs} runs per model, batch 1, median",
               "seconds": time.perf_counter() - start, "rows": rows}
    write_outputs(summary, args.out)
    return 0


def write_outputs(summary: dict, out: Path) -> None:
    """JSON, a markdown table (mean +- std over seeds) and the plot of ratio against delta_m."""
    rows = summary["rows"]
    for r in rows:
        r["predicted_ratio"] = r["macs_ratio"] / r["predicted_fraction"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    size = summary["input_size"]
    lines = [f"latency budget {summary['budget']} of dense, input {size[0]}x{size[1]}, {summary['threads']} thread(s), "
             f"recovery {summary['recovery']}, seeds {sorted({r['seed'] for r in rows})}; dense {summary['dense_ms']:.3f}"
             f" ms in the timing run (the table, measured just before it: {summary['table']['dense_ms']:.3f} ms)", "",
             "| plan | measured / dense | MACs ratio | speed-up / MAC red. (table) | speed-up / MAC red. (measured) "
             "| delta_m before | delta_m after |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["plan"] for r in rows):
        sel = [r for r in rows if r["plan"] == name]

        def stat(key: str, sel=sel) -> str:
            v = np.asarray([r[key] for r in sel], float)
            return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} +- {v.std(ddof=1):.3f}"
        lines.append(f"| {name} | {stat('measured_fraction')} | {stat('macs_ratio')} | {stat('predicted_ratio')} | "
                     f"{stat('speedup_per_mac_reduction')} | {stat('delta_m_before_recovery')} | {stat('delta_m')} |")
    lines += ["", f"total {summary['seconds']:.0f} s, load {summary['load_1min']:.2f}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out.with_suffix(".png"), summary["budget"])


def plot(rows: list[dict], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["plan"] for r in rows):
        sel = [r for r in rows if r["plan"] == name]
        ax.scatter([r["speedup_per_mac_reduction"] for r in sel], [r["delta_m"] for r in sel], label=name,
                   marker="*" if name == "latency planner" else "o", s=90 if name == "latency planner" else 40)
    ax.axvline(0.9, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("speed-up / MAC reduction (measured)")
    ax.set_ylabel("delta_m after recovery (%)")
    ax.set_title(f"latency budget {budget} of dense: ratio against accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
