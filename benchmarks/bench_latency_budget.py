"""Latency budgets on this machine: asked vs achieved latency, and latency- vs MAC-planned models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_latency_budget.py [--model runs/pretrained-scenes]
        [--tasks seg,depth] [--budgets 0.3,0.4,0.5,0.6,0.7,0.8] [--recovery-steps 100] [--cached-table]
        [--input-size 128] [--checks 3]

One run, side by side. The decomposed model's latency table is measured (or read from the cache) with
onnxruntime on --threads threads (default 1), batch 1. For each budget f (a fraction of the dense model's
measured time) `cut.pipeline.prune` (method cut, the same scoring / recovery data and recovery budget
for every model, --seed, default 0) builds:

- `latency`: the plan against the table (`--budget latency=f`);
- `checked` (with --checks N > 0, default 3): the plan `cutfl prune --budget latency=f` makes, up to N plans
  timed whole beside the dense model before recovery, each measurement added to the table's calibration
  (`cut.latency.check_plan`);
- `macs`: the MAC-budget plan whose *predicted* latency is the same (the largest MAC fraction whose plan
  the table predicts at or below the latency plan's), i.e. equal latency, planned by MACs.

Every model, dense included, is exported to ONNX and timed in interleaved rounds (rounds x runs batch-1
forwards each, after warm-up) right after the table is measured (a shared machine's load drifts over
minutes: a table measured under another load predicts another machine); then each plan goes through
`cut.pipeline.prune` again (same plan, checked) with recovery and evaluation. The table reports measured latency as a fraction of the dense
model's time in that same run, the error against the asked fraction, speed-up / MAC reduction, and
delta_m (per-task metrics against the dense model) before and after recovery.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py
from model_data import load_model_and_data  # benchmarks/model_data.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matched_macs_fraction(per_task, analysis, cost, target_ms: float) -> tuple[float, object]:
    """Largest MAC fraction whose cut plan the latency table predicts at or below `target_ms` (bisection)."""
    from cut.planner import plan_from_scores

    def predicted(f: float):
        plan = plan_from_scores(per_task, analysis, "macs", f, method="cut")
        return cost.predict_ms(cost.counts_vector({g: len(k) for g, k in plan.keep.items()})), plan

    lo, hi = 0.05, 1.0
    best = (lo, predicted(lo)[1])
    for _ in range(18):
        mid = (lo + hi) / 2
        ms, plan = predicted(mid)
        if ms <= target_ms:
            lo, best = mid, (mid, plan)
        else:
            hi = mid
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/pretrained-scenes"))
    p.add_argument("--tasks", default="seg,depth")
    p.add_argument("--budgets", default="0.3,0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--recovery-batch-size", type=int, default=32)
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--test-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="scoring / recovery data and recovery seed")
    p.add_argument("--input-size", type=int, default=None,
                   help="run the model (and its data) at this square size instead of the size it was trained at")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    p.add_argument("--runs", type=int, default=10, help="timed runs per model per round")
    p.add_argument("--checks", type=int, default=3,
                   help="also plan each budget as `cutfl prune` does: up to this many plans timed whole before "
                        "recovery (cut.latency.check_plan), the 'checked' rows; 0: none")
    p.add_argument("--cached-table", action="store_true",
                   help="use a cached latency table if there is one (default: measure it now, beside the timing)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_budget"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cut.budget import BudgetOptions
    from cut.export import check_parity, export_onnx
    from cut.groups import analyse
    from cut.importance import score_tasks
    from cut.latency import check_plan, interleaved_ms, latency_cost, table_for
    from cut.models import count_macs
    from cut.pipeline import RecoveryConfig, prune, seed_data

    start = time.perf_counter()
    base, card, train, test = load_model_and_data(args.model, args.train_samples, args.test_samples, args.input_size)
    tasks = args.tasks.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    recovery = RecoveryConfig(steps=args.recovery_steps, batch_size=args.recovery_batch_size)
    data = seed_data(train, args.seed, 32, 4, recovery)
    test_batches = test.batches(64)
    dense = base.decompose(tasks).eval()
    table = table_for(dense, card["weights_sha256"], threads=args.threads, refresh=not args.cached_table)
    print(f"latency table: round_to {table.round_to}, dense {table.dense_ms:.3f} ms, measured in {table.seconds} s "
          f"({'read from the cache if there was one' if args.cached_table else 'now'})", file=sys.stderr)
    analysis = analyse(dense)
    cost = latency_cost(analysis, table)
    per_task = score_tasks(dense, data.scoring, tasks, "fisher", len(data.scoring), args.seed)

    # Pass 1, right after the table: plan every model, export and time it (architecture only: recovery does
    # not change it), so that the table and the timing see the same machine load.
    from cut.compact import compact_model
    from cut.planner import plan_from_scores

    rows = []
    for f in budgets:
        lat_plan = plan_from_scores(per_task, analysis, "latency", f, options=BudgetOptions(latency=table), method="cut")
        macs_value, macs_plan = matched_macs_fraction(per_task, analysis, cost,
                                                      lat_plan.achieved["latency_ms_predicted"])
        candidates = [("latency", "latency", f, lat_plan, table), ("macs", "macs", macs_value, macs_plan, table)]
        if args.checks:
            def plan_for(t, f=f):
                return plan_from_scores(per_task, analysis, "latency", f, options=BudgetOptions(latency=t), method="cut")
            checked_table, checked_plan, checks = check_plan(dense, table, plan_for, f, threads=args.threads,
                                                             max_checks=args.checks)
            candidates.append(("checked", "latency", f, checked_plan, checked_table))
        for planner, kind, value, plan, plan_table in candidates:
            kept = cost.counts_vector({g: len(k) for g, k in plan.keep.items()})
            rows.append({"budget": f, "planner": planner, "kind": kind, "value": value, "keep": plan.keep,
                         "table": plan_table, "checks": [vars(c) for c in checks] if planner == "checked" else None,
                         "model": compact_model(dense, plan).eval(), "macs_ratio": plan.achieved["macs_ratio"],
                         "params_ratio": plan.achieved["params_ratio"], "predicted_ms": cost.predict_ms(kept),
                         "kept": {g: len(k) for g, k in plan.keep.items()}})
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "dense.onnx"]
        export_onnx(dense, paths[0])
        parity = [check_parity(dense, paths[0], n=2)]
        for i, row in enumerate(rows):
            paths.append(Path(tmp) / f"m{i}.onnx")
            export_onnx(row["model"], paths[-1])
            parity.append(check_parity(row["model"], paths[-1], n=2))
        times = interleaved_ms(paths, args.threads, rounds=args.rounds, runs=args.runs)
    print(f"timed {len(paths)} models, {time.perf_counter() - start:.0f} s in", file=sys.stderr)
    dense_ms, dense_macs = times[0], count_macs(dense)
    for row, ms in zip(rows, times[1:], strict=True):
        row["measured_ms"] = ms
        row["measured_fraction"] = ms / dense_ms
        row["speedup_per_mac_reduction"] = (dense_ms / ms) * row["macs_ratio"]
        row["macs"] = count_macs(row.pop("model"))

    # Pass 2: the same plans through cut.pipeline.prune (same scoring data), with recovery and evaluation.
    dense_metrics = None
    for row in rows:
        t0 = time.perf_counter()
        plan_table = row.pop("table")
        options = BudgetOptions(latency=plan_table) if row["kind"] == "latency" else None
        _, plan, report = prune(
            base, tasks, row["kind"], row["value"], method="cut", test_loader=test_batches, seed=args.seed,
            base_sha256=card["weights_sha256"], recovery=recovery, scoring_batches=data.scoring,
            recovery_batches=data.recovery, progress=False, options=options, dense_metrics=dense_metrics)
        if plan.keep != row.pop("keep"):
            raise RuntimeError(f"{row['planner']} {row['budget']}: prune planned another model than pass 1")
        dense_metrics = report["metrics"]["dense"]
        row.update(delta_m=report["delta_m"], delta_m_before_recovery=report.get("delta_m_before_recovery"),
                   metrics=report["metrics"]["compact"])
        print(f"{row['planner']} {row['budget']}: {row['kind']}={row['value']:.3f}, delta_m {report['delta_m']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    lat = [r for r in rows if r["planner"] == "latency"]
    mac = [r for r in rows if r["planner"] == "macs"]
    errors = [r["measured_fraction"] / r["budget"] - 1 for r in lat]
    # Equal *measured* latency: the MAC plans' delta_m interpolated at each latency plan's measured time
    # (the pairs above are matched on the table's prediction, which can be off for the MAC plans).
    by_ms = sorted(mac, key=lambda r: r["measured_ms"])
    xs, ys = [r["measured_ms"] for r in by_ms], [r["delta_m"] for r in by_ms]
    at_equal = [float(np.interp(r["measured_ms"], xs, ys)) if xs[0] <= r["measured_ms"] <= xs[-1] else None
                for r in lat]
    chk = [r for r in rows if r["planner"] == "checked"]
    chk_errors = [r["measured_fraction"] / r["budget"] - 1 for r in chk]
    chk_equal = [float(np.interp(r["measured_ms"], xs, ys)) if xs[0] <= r["measured_ms"] <= xs[-1] else None
                 for r in chk]
    summary = {
        "date": date.today().isoformat(), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "load_1min": os.getloadavg()[0], "model": str(args.model), "weights": card["weights_sha256"][:12],
        "tasks": tasks, "seed": args.seed, "input_size": list(base.config.input_size), "threads": args.threads,
        "recovery": recovery.budget(),
        "timing": f"{args.rounds} interleaved rounds x {args.runs} runs per model, batch 1, median",
        "table": {"round_to": table.round_to, "dense_ms": table.dense_ms, "seconds": table.seconds,
                  "runtime": table.runtime, "calibration": table.calibration},
        "dense_ms": dense_ms, "dense_macs": dense_macs, "max_parity": max(parity),
        "median_error": statistics.median(errors), "median_abs_error": statistics.median(abs(e) for e in errors),
        "delta_m_latency_minus_macs": [r["delta_m"] - m["delta_m"] for r, m in zip(lat, mac, strict=True)],
        "delta_m_latency_minus_macs_at_measured_latency": [None if a is None else r["delta_m"] - a
                                                           for r, a in zip(lat, at_equal, strict=True)],
        "seconds": time.perf_counter() - start, "rows": rows,
    }
    if chk:
        summary.update(median_error_checked=statistics.median(chk_errors),
                       median_abs_error_checked=statistics.median(abs(e) for e in chk_errors),
                       delta_m_checked_minus_macs_at_measured_latency=[None if a is None else r["delta_m"] - a
                                                                       for r, a in zip(chk, chk_equal, strict=True)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    lines = [f"input {base.config.input_size[0]}x{base.config.input_size[1]}, "
             f"dense {dense_ms:.3f} ms (table: {table.dense_ms:.3f} ms, round_to {table.round_to}), "
             f"recovery {recovery.budget()}, parity <= {max(parity):.1e}", "",
             "| asked | planner | plan | measured ms | measured / dense | error | MACs ratio | speed-up / MAC red. "
             "| delta_m before | delta_m after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plan = f"{r['kind']}={r['value']:.3f}"
        err = f"{r['measured_fraction'] / r['budget'] - 1:+.1%}" if r["planner"] != "macs" else ""
        lines.append(f"| {r['budget']:.1f} | {r['planner']} | {plan} | {r['measured_ms']:.3f} | "
                     f"{r['measured_fraction']:.3f} | {err} | {r['macs_ratio']:.3f} | "
                     f"{r['speedup_per_mac_reduction']:.2f} | {r['delta_m_before_recovery']:.2f} | "
                     f"{r['delta_m']:.2f} |")
    lines += ["", f"median error (latency plans): {summary['median_error']:+.1%}, median |error| "
              f"{summary['median_abs_error']:.1%}; delta_m latency - macs: "
              + ", ".join(f"{d:+.2f}" for d in summary["delta_m_latency_minus_macs"])
              + " (pairs matched on predicted latency); at equal measured latency (MAC plans interpolated): "
              + ", ".join("outside" if d is None else f"{d:+.2f}"
                          for d in summary["delta_m_latency_minus_macs_at_measured_latency"]),
              f"total {summary['seconds']:.0f} s, load {summary['load_1min']:.2f}"]
    if chk:
        lines.insert(-1, f"checked plans (up to {args.checks} timed whole before recovery): median error "
                         f"{summary['median_error_checked']:+.1%}, median |error| {summary['median_abs_error_checked']:.1%}, "
                         f"plans timed per budget " + ", ".join(str(len(r["checks"])) for r in chk)
                         + "; delta_m checked - macs at equal measured latency: "
                         + ", ".join("outside" if d is None else f"{d:+.2f}"
                                     for d in summary["delta_m_checked_minus_macs_at_measured_latency"]))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
