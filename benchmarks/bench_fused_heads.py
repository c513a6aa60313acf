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
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from machine import cpu_model, write_result  # benchmarks/machine.py
from model_data import dense_and_plans  # benchmarks/model_data.py

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

    from cut.export import INPUT_NAME, export_onnx
    from cut.infer import cpu_session
    from cut.latency import interleaved_ms
    from cut.models import count_macs

    start = time.perf_counter()
    tasks = args.tasks.split(",")
    _, _, models = dense_and_plans(args.model, tasks, [float(b) for b in args.budgets.split(",")], args.kind,
                                   args.cached_table)
    dense = models[0][1]
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
    write_result(args.out, "\n".join(lines), {"tasks": tasks, "kind": args.kind, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
