"""Where a compact model's time goes on onnxruntime: per stage of the network, dense vs latency-planned.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_latency_breakdown.py [--model runs/pretrained-scenes]
        [--tasks seg,depth] [--budgets 0.5] [--runs 300] [--cached-table]

The decomposed model and its latency plans (method cut, fisher scores on 4 batches of 32, planned against the
table measured now) are exported as `cutfl export` writes them and run --runs times each (1 thread, batch 1)
with onnxruntime's profiler on. Each node's median kernel time is summed per stage (stem, layer1..4 of the
backbone, the heads, and `output`: the resize, split and layout reorders that no conv counts), beside the
stage's MACs (Conv2d and Linear, as `cut.models.count_macs`). Speed-up / MAC reduction is the plan's MACs
per second over the dense model's, so a stage that keeps its time while the rest shrinks (a fixed cost)
caps it: this says which stage does.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from machine import cpu_model, write_result  # benchmarks/machine.py
from model_data import dense_and_plans  # benchmarks/model_data.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "heads", "output")


def stage_of(name: str) -> str:
    """The stage of a module path (`backbone.layer3.0.conv1`, `heads.seg...`) or an exported node's name."""
    parts = [p for p in name.replace(".", "/").split("/") if p]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        if stage in parts:
            return stage
    if "heads" in parts or ("fused" in parts and "resize" not in parts and "Split" not in parts):
        return "heads"
    if "backbone" in parts:
        return "stem"
    return "output"


def stage_macs(model) -> dict[str, int]:
    import torch
    from torch import nn

    totals: dict[str, int] = collections.defaultdict(int)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            handles.append(module.register_forward_hook(
                lambda m, i, out, s=stage_of(name), k=k: totals.__setitem__(s, totals[s] + out[0].numel() * k)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(
                lambda m, i, out, s=stage_of(name): totals.__setitem__(s, totals[s] + out[0].numel() * m.in_features)))
    with torch.no_grad():
        model.eval()(torch.zeros(1, model.config.in_channels, *model.config.input_size))
    for h in handles:
        h.remove()
    return dict(totals)


def stage_us(path: Path, runs: int, directory: str) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(directory) / path.stem)
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
        [1 if not isinstance(d, int) else d for d in session.get_inputs()[0].shape]).astype(np.float32)}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"].removesuffix("_kernel_time")].append(float(e["dur"]))
    out: dict[str, float] = collections.defaultdict(float)
    for node, durations in per_node.items():
        out[stage_of(node)] += float(np.median(durations[len(durations) // 10:]))  # the first tenth: warm-up
    return dict(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/pretrained-scenes"))
    p.add_argument("--tasks", default="seg,depth")
    p.add_argument("--budgets", default="0.5")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--cached-table", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_breakdown"))
    args = p.parse_args()

    from cut.export import export_onnx

    start = time.perf_counter()
    tasks = args.tasks.split(",")
    _, table, models = dense_and_plans(args.model, tasks, [float(f) for f in args.budgets.split(",")], "latency",
                                      args.cached_table)
    dense = models[0][1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models:
            path = Path(tmp) / f"{name.replace('=', '_')}.onnx"
            export_onnx(model, path)
            results[name] = {"us": stage_us(path, args.runs, tmp), "macs": stage_macs(model)}
    dense_us, dense_macs = sum(results["dense"]["us"].values()), sum(results["dense"]["macs"].values())
    lines = [f"{args.model} ({args.tasks}, {dense.config.input_size[0]}x{dense.config.input_size[1]}); {date.today()}, "
             f"{cpu_model()}, onnxruntime profiler, 1 thread, median of {args.runs} runs per node, summed per stage; "
             f"table round_to {table.round_to}; {time.perf_counter() - start:.0f} s", ""]
    header = "| stage | " + " | ".join(f"{n} us | {n} MMACs | {n} GMAC/s" for n in results) + " |"
    lines += [header, "|---" * (1 + 3 * len(results)) + "|"]
    for stage in (*STAGES, "total"):
        cells = []
        for r in results.values():
            us = sum(r["us"].values()) if stage == "total" else r["us"].get(stage, 0.0)
            macs = sum(r["macs"].values()) if stage == "total" else r["macs"].get(stage, 0)
            cells.append(f"{us:.0f} | {macs / 1e6:.2f} | {macs / us / 1e3 if us else 0:.0f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, r in list(results.items())[1:]:
        us, macs = sum(r["us"].values()), sum(r["macs"].values())
        fixed = sum(r["us"].get(s, 0.0) for s in ("stem", "layer1", "layer2", "output"))
        lines.append(f"{name}: time {us / dense_us:.3f} of dense (node sums), MACs {macs / dense_macs:.3f}, speed-up / "
                     f"MAC reduction {macs / dense_macs / (us / dense_us):.2f}; stem + layer1 + layer2 + output "
                     f"{fixed:.0f} us = {fixed / us:.0%} of its time (dense: "
                     f"{sum(results['dense']['us'].get(s, 0.0) for s in ('stem', 'layer1', 'layer2', 'output')) / dense_us:.0%})")
    write_result(args.out, "\n".join(lines), {"tasks": tasks, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
