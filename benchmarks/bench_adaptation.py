"""On-device adaptation recipes on the delivered models of a finished `cutfl simulate` run.

    python benchmarks/bench_adaptation.py runs/simulate --variants "40,3e-5,0.5,frozen;40,1e-4,0.5,train"

A variant is `steps,lr,distill_weight,bn` (bn: `frozen` keeps the delivered BatchNorm statistics, `train`
updates them from the device's batches; `frozen-dense` / `train-dense` adapt the dense base model instead, to
see whether the device's labels can improve even the model the compact one is compared with). For every
device of the run it loads the model as delivered from the device's store, adapts it on half of the
device's training samples exactly as `client.adapt` splits them, and reports the validation gain the device
would decide on and the held-out delta_m that decides the target (the device's own evaluation samples,
which adaptation never sees). Prints one line per device and a summary per variant; writes OUT as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from client.adapt import split_for_adaptation  # noqa: E402
from client.data import local_data  # noqa: E402
from cut.checkpoint import load_model  # noqa: E402
from cut.train import evaluate, finetune, make_loader, multitask_delta  # noqa: E402
from simulations.oracle import completed_devices, finished_run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="output directory of a finished `cutfl simulate` run")
    ap.add_argument("--variants", default="40,3e-5,0.5,frozen;40,1e-4,0.5,frozen;40,1e-4,0.5,train")
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--devices", type=int, default=0, help="only the first N devices (0: all)")
    ap.add_argument("--seed", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    scenario, base, report = finished_run(args.run, args.scenario)
    _, devices = completed_devices(scenario, report)
    devices = devices[:args.devices] if args.devices > 0 else devices
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    results = {}
    for d in devices:
        store = args.run / "store" / "devices" / d.device_id
        delivered_sha = json.loads((store / "active.json").read_text())["source_sha256"]
        delivered, _ = load_model(store / "models" / delivered_sha)
        delivered.eval()
        tasks = list(base.canonical(d.tasks))
        data = local_data(d)
        dense = base.decomposed(tuple(tasks)).eval()
        held = make_loader(data.eval, 32)
        dense_metrics = evaluate(dense, held, tasks)
        row = {"tasks": tasks, "budget": d.budget.value, "eval_samples": len(data.eval),
               "delivered": multitask_delta(base.model, evaluate(delivered, held, tasks), dense_metrics)}
        fit, check = split_for_adaptation(data)
        check_loader = make_loader(check, 16)
        for v in variants:
            steps, lr, weight, bn = v.split(",")
            start_model = dense if bn.endswith("-dense") else delivered
            before = evaluate(start_model, check_loader, tasks)
            candidate = copy.deepcopy(start_model)
            started = time.perf_counter()
            torch.manual_seed(args.seed)
            finetune(candidate, dense, make_loader(fit, 16, shuffle=True, seed=args.seed), steps=int(steps),
                     lr=float(lr), distill_weight=float(weight), progress=False,
                     freeze_bn_stats=bn.startswith("frozen"))
            candidate.eval()
            row[v] = {"val_gain": multitask_delta(base.model, evaluate(candidate, check_loader, tasks), before),
                      "held": multitask_delta(base.model, evaluate(candidate, held, tasks), dense_metrics),
                      "seconds": time.perf_counter() - started}
        results[d.device_id] = row
        print(d.device_id, ",".join(tasks), d.budget.value, f"delivered {row['delivered']:+.2f}",
              " ".join(f"[{v}: val {row[v]['val_gain']:+.2f} held {row[v]['held']:+.2f}]" for v in variants),
              flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print("\n| variant | devices | held-out change if always kept | lower on | kept (val gain > 0) "
          "| kept but lower | fleet mean as kept | at/above dense |\n|---|---|---|---|---|---|---|---|")
    for v in variants:
        rows = list(results.values())
        change = [r[v]["held"] - r["delivered"] for r in rows]
        kept = [r[v]["val_gain"] > 0 for r in rows]
        final = [r[v]["held"] if k else r["delivered"] for r, k in zip(rows, kept, strict=True)]
        lower = sum(k and r[v]["held"] < r["delivered"] for r, k in zip(rows, kept, strict=True))
        print(f"| {v} | {len(rows)} | {statistics.fmean(change):+.2f} | {sum(c < 0 for c in change)} | {sum(kept)} "
              f"| {lower} | {statistics.fmean(final):+.2f} | {sum(f >= 0 for f in final)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
