"""The exported dense heads: each head's own convs vs `cut.export.FusedDenseHeads`, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fused_heads.py [--model runs/pretrained-scenes]
        [--tasks seg,depth] [--budgets 0.3,0.4,0.5,0.6,0.7,0.8] [--kind latency] [--cached-table]

The decomposed model and its compact models (method cut, fisher scores on the same 4 batches of 32, planned
by --kind: `latency` against the table measured now on this machine, or `macs`) are each exported twice,
`export_onnx(..., fuse_heads=False)` (every head branch its own conv -> BN -> ReLU -> 1x1 conv, summed per
head, each dense output resized on its own) and as `export_onnx` writes them by default, and every graph is
timed in the same interleaved rounds (`cut.latency.interleaved_ms`, 1 thread, batch 1). Reports each model's
time both ways, their ratio, the largest output difference between the two graphs, and speed-up / MAC
reduction against the dense model exported the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py
from model_data import load_model_and_data  # benchmarks/model_data.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/pretrained-scenes"))
    p.add_argument("--tasks", default="seg,depth")
    p.add_argument("--budgets", default="0.3,0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--kind", choices=("latency", "macs"), default="latency")
    p.add_argument("--cached-table", action="store_true", help="latency plans: a cached table if there is one")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_heads"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from cut.budget import BudgetOptions
    from cut.compact import compact_model
    from cut.export import INPUT_NAME, export_onnx
    from cut.groups import analyse
    from cut.importance import score_tasks
    from cut.infer import cpu_session
    from cut.latency import interleaved_ms, table_for
    from cut.models import count_macs
    from cut.pipeline import RecoveryConfig, seed_data
    from cut.planner import plan_from_scores

    start = time.perf_counter()
    base, card, train, _ = load_model_and_data(args.model, 256, 1)
    tasks = args.tasks.split(",")
    dense = base.decompose(tasks).eval()
    analysis = analyse(dense)
    data = seed_data(train, 0, 32, 4, RecoveryConfig(steps=1, batch_size=32))
    per_task = score_tasks(dense, data.scoring, tasks, "fisher", len(data.scoring), 0)
    options = BudgetOptions()
    if args.kind == "latency":
        options = BudgetOptions(latency=table_for(dense, card["weights_sha256"], refresh=not args.cached_table))
    budgets = [float(b) for b in args.budgets.split(",")]
    models = [("dense", dense)] + [
        (f"{args.kind}={f}", compact_model(dense, plan_from_scores(per_task, analysis, args.kind, f, options=options,
                                                                   method="cut")).eval())
        for f in budgets]
    example = np.random.default_rng(0).standard_normal((1, 3, *dense.config.input_size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths, diffs = [], []
        for i, (_, model) in enumerate(models):
            pair = [Path(tmp) / f"{i}-{way}.onnx" for way in ("own", "fused")]
            export_onnx(model, pair[0], fuse_heads=False)
            export_onnx(model, pair[1])
            outs = [cpu_session(path, 1, quiet=True).run(None, {INPUT_NAME: example}) for path in pair]
            diffs.append(max(float(np.abs(a - b).max()) for a, b in zip(*outs, strict=True)))
            paths += pair
        ms = interleaved_ms(paths, 1, rounds=args.rounds, runs=args.runs)
    own, fused = ms[0::2], ms[1::2]
    dense_macs = count_macs(dense)
    rows = []
    for (name, model), a, b, diff in zip(models, own, fused, diffs, strict=True):
        macs = count_macs(model) / dense_macs
        rows.append({"model": name, "macs_ratio": macs, "own_ms": a, "fused_ms": b, "fused_over_own": b / a,
                     "ratio_own": (own[0] / a) * macs, "ratio_fused": (fused[0] / b) * macs, "max_diff": diff})
    lines = [f"{args.model} ({args.tasks}, {dense.config.input_size[0]}x{dense.config.input_size[1]}), plans by "
             f"{args.kind}; {date.today()}, {cpu_model()}, 1 thread, {args.rounds} x {args.runs} interleaved runs; "
             f"{time.perf_counter() - start:.0f} s", "",
             "| model | MACs ratio | heads' own convs ms | fused ms | fused / own | speed-up / MAC red. (own) "
             "| (fused) | max output difference |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['macs_ratio']:.3f} | {r['own_ms']:.3f} | {r['fused_ms']:.3f} | "
                     f"{r['fused_over_own']:.3f} | {r['ratio_own']:.2f} | {r['ratio_fused']:.2f} | "
                     f"{r['max_diff']:.1e} |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"date": str(date.today()), "machine": cpu_model(),
                                                         "tasks": tasks, "kind": args.kind, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
