"""Time one device's pruning work: scoring + fusion + planning + compaction (data loading excluded).

    /work/venv/bin/python benchmarks/bench_prune_speed.py [--model runs/pretrained-scenes] [--tasks seg,depth,normals]
        [--batches 4] [--batch-size 32] [--criterion fisher] [--repeats 7] [--threads 0]

The scoring batches are rendered once before timing (a device holds its data already). Each repeat runs
`cut.methods.plan_with("cut", ...)` and `cut.compact.compact_model` on the decomposed model; the first
repeat is a warm-up (oneDNN builds kernels for new shapes) and is not counted. Prints the median and
min/max of every stage over the remaining repeats, plus the machine and its load, as markdown. On a
shared machine, the process CPU time with `--threads 1` estimates the wall time an idle core would take.
Target: total <= 1 s for 4 batches of 32 on the default model (resnet18 width 0.25, 64x64).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import cpu_model  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)

from cut.compact import compact_model  # noqa: E402
from cut.data import get_dataset  # noqa: E402
from cut.data.scenes import scene_tasks  # noqa: E402
from cut.importance import take_batches  # noqa: E402
from cut.methods import PlanRequest, plan_with  # noqa: E402
from cut.models import ModelConfig, build_model  # noqa: E402
from cut.train import make_loader  # noqa: E402


def load_base(path: str):
    try:
        from cut.checkpoint import load_model

        model, card = load_model(path)
        return model, f"{path} (sha256 {card['weights_sha256'][:12]})"
    except Exception as e:  # noqa: BLE001 - any failure means: time a random-init model instead
        return build_model(ModelConfig(tasks=scene_tasks())), f"random init ({type(e).__name__}: {e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/pretrained-scenes")
    ap.add_argument("--tasks", default="seg,depth,normals")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--criterion", default=None, help="default: the cut method's criterion")
    ap.add_argument("--fusion", default=None)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, source = load_base(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    model = base.decompose(tasks).eval()
    size = model.config.input_size[0]
    data = get_dataset("scenes", "train", num_samples=args.batches * args.batch_size, size=size, seed=0)
    batches = take_batches(make_loader(data, args.batch_size), args.batches)
    stages: dict[str, list[float]] = {}
    for i in range(args.repeats + 1):
        cpu = time.process_time()
        request = PlanRequest(model, batches, tuple(tasks), "params", args.budget, seed=i)
        result = plan_with("cut", request, criterion=args.criterion, fusion_rule=args.fusion)
        t = time.perf_counter()
        compact_model(model, result.plan)
        seconds = dict(result.seconds, compaction=time.perf_counter() - t)
        seconds["total"] = sum(seconds.values())
        seconds["total, process CPU time"] = time.process_time() - cpu
        if i == 0:
            continue  # warm-up
        for k, v in seconds.items():
            stages.setdefault(k, []).append(v)
    print(f"# pruning speed: {args.batches} batches of {args.batch_size}, tasks {','.join(tasks)}, "
          f"criterion {result.info['criterion']}, budget {args.budget} params\n")
    print(f"model: {source}; machine: {os.cpu_count()} cores, {cpu_model()}; torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}; {args.repeats} timed repeats\n")
    print("| stage | median s | min s | max s |\n|---|---|---|---|")
    for k, v in stages.items():
        print(f"| {k} | {statistics.median(v):.4f} | {min(v):.4f} | {max(v):.4f} |")


if __name__ == "__main__":
    main()
