"""Server-side recovery steps against the fleet's delta_m and the server's seconds, on one federation's plans.

    python benchmarks/bench_recovery_steps.py runs/simulate --steps 0,100,300,1000

Takes the plans a finished `cutfl simulate` run made (OUT/state/plans, the devices of OUT/report.json),
recovers them again with each number of steps (every other [recovery] setting as in the scenario) and
measures each device's delta_m as the device does (simulations.oracle.device_deltas). With the steps the run
used, the figures equal the run's own report: the transport adds nothing to them. Prints a markdown table
and writes OUT/recovery_steps.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cut.budget import BudgetOptions  # noqa: E402
from cut.plan import PruningPlan  # noqa: E402
from server.planning import PlanBook  # noqa: E402
from server.recovery import recover_plans  # noqa: E402
from server.report import t95  # noqa: E402
from simulations.oracle import completed_devices, device_deltas, finished_run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="output directory of a finished `cutfl simulate` run")
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--steps", default="0,100,300,1000")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scenario, base, report = finished_run(args.run, args.scenario)
    settings = scenario.settings
    ok, devices = completed_devices(scenario, report)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        p = settings.planning
        book = PlanBook(base, BudgetOptions(p.min_channels, p.min_fraction, p.round_to), p.normalise)
        plans = {}
        for d in devices:
            plan = PruningPlan.from_json((args.run / "state" / "plans" / f"{ok[d.device_id]['plan_hash']}.json")
                                         .read_text())
            book.build(plan)
            plans[d.device_id] = plan.plan_hash
        start = time.perf_counter()
        cost = recover_plans(book, base, settings.recovery.model_copy(update={"steps": steps}))
        seconds = time.perf_counter() - start
        deltas = device_deltas(base, book, plans, devices, settings)
        values = list(deltas.values())
        by_budget: dict[str, list[float]] = {}
        for d in devices:
            by_budget.setdefault(f"{d.budget.value:g}", []).append(deltas[d.device_id])
        half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
        row = {"steps": steps, "plans": len(book.builds), "mean": statistics.fmean(values), "ci95": half,
               "by_budget": {k: statistics.fmean(v) for k, v in sorted(by_budget.items())},
               "seconds": round(seconds, 1), "recovery_seconds": cost["seconds"], "deltas": deltas}
        rows.append(row)
        print(f"steps {steps}: mean {row['mean']:.2f} +- {half:.2f}, {row['by_budget']}, {seconds:.0f} s", flush=True)
    (args.run / "recovery_steps.json").write_text(json.dumps(rows, indent=2))
    print("\n| steps per plan | mean delta_m (95% interval) | " +
          " | ".join(f"budget {k}" for k in rows[0]["by_budget"]) + " | server seconds |")
    print("|---" * (3 + len(rows[0]["by_budget"])) + "|")
    for r in rows:
        print(f"| {r['steps']} | {r['mean']:.2f} +- {r['ci95']:.2f} | " +
              " | ".join(f"{v:.2f}" for v in r["by_budget"].values()) + f" | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
