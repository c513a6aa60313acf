"""How far a device's timing of its delivered model moves between measurements, and what repeating it buys.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_timing_noise.py [--model runs/pretrained-scenes]
        [--tasks seg,depth] [--budget 0.5] [--measurements 30] [--repeats 3]

A device with a latency budget times its compact model beside its dense decomposed model
(`client.latency.delivered_latency`: interleaved rounds, the median of each) and reports the fraction; the server
re-plans it when that is more than 3% over or 6% under the asked fraction. In the simulated latency fleet
some devices ended 4-7% over after the checks. This measures the fraction --measurements times per condition
on the same two ONNX models (the dense model and its latency plan at --budget):

- `alone`: one process timing, nothing else running (the reference: its median);
- `two at once`: two processes timing at the same time (two simulated devices on a 2-core host);
- `beside training`: one process timing while another trains the dense model (the server recovering a plan).

For each: the spread of single measurements (std, largest distance from the reference) and of the median of
--repeats consecutive measurements, as `delivered_latency(..., repeats=N)` reports it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import write_result  # benchmarks/machine.py
from model_data import dense_and_plans  # benchmarks/model_data.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fractions(paths: list[str], measurements: int, out) -> None:
    """Time (dense, plan) `measurements` times, as a device does once; put the plan/dense fractions on `out`."""
    from cut.latency import interleaved_ms

    values = []
    for _ in range(measurements):
        dense_ms, plan_ms = interleaved_ms(paths, 1, rounds=12, runs=10)
        values.append(plan_ms / dense_ms)
    out.put(values)


def train_until(stop, model_dir: str, tasks: list[str]) -> None:
    """Train the dense model on random batches (one thread) until `stop` is set: a server recovering a plan."""
    import torch

    from cut.checkpoint import load_model

    torch.set_num_threads(1)
    model = load_model(model_dir)[0].decompose(tasks).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4)
    images = torch.randn(32, model.config.in_channels, *model.config.input_size)
    while not stop.is_set():
        loss = sum(o.float().pow(2).mean() for o in model(images).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def run_condition(name: str, paths: list[str], measurements: int, model_dir: str, tasks: list[str]) -> list[float]:
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    timers = [ctx.Process(target=fractions, args=(paths, measurements, out)) for _ in range(2 if name == "two at once" else 1)]
    trainer = ctx.Process(target=train_until, args=(stop, model_dir, tasks)) if name == "beside training" else None
    if trainer:
        trainer.start()
        time.sleep(5)  # past its start-up
    for p in timers:
        p.start()
    values = [v for _ in timers for v in out.get()]
    for p in timers:
        p.join()
    if trainer:
        stop.set()
        trainer.join()
    return values


def spread(values: list[float], reference: float) -> dict[str, float]:
    errors = [v / reference - 1 for v in values]
    return {"n": len(values), "mean_error": statistics.fmean(errors), "std": statistics.pstdev(errors),
            "max_abs_error": max(abs(e) for e in errors)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/pretrained-scenes"))
    p.add_argument("--tasks", default="seg,depth")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--measurements", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/timing_noise"))
    args = p.parse_args()

    from cut.export import export_onnx

    start = time.perf_counter()
    tasks = args.tasks.split(",")
    _, _, models = dense_and_plans(args.model, tasks, [args.budget], "latency", cached_table=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, model in models:
            paths.append(str(Path(tmp) / f"{name.replace('=', '_')}.onnx"))
            export_onnx(model, paths[-1])
        for condition in ("alone", "two at once", "beside training"):
            results[condition] = run_condition(condition, paths, args.measurements, str(args.model), tasks)
            print(f"{condition}: {len(results[condition])} measurements", file=sys.stderr)
    reference = statistics.median(results["alone"])
    k = args.repeats
    lines = [f"{args.model} ({args.tasks}), the latency plan at {args.budget} beside the dense model; each measurement "
             f"as client.latency.delivered_latency (12 interleaved rounds x 10 runs, 1 thread); reference: the median "
             f"of `alone` = {reference:.4f}; {time.perf_counter() - start:.0f} s", "",
             "| condition | measurements | mean error | std | largest error | median of "
             f"{k}: std | median of {k}: largest error |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for condition, values in results.items():
        single = spread(values, reference)
        medians = [statistics.median(values[i:i + k]) for i in range(0, len(values) - k + 1, k)]
        repeated = spread(medians, reference)
        summary[condition] = {"values": values, "single": single, f"median_of_{k}": repeated}
        lines.append(f"| {condition} | {single['n']} | {single['mean_error']:+.1%} | {single['std']:.1%} | "
                     f"{single['max_abs_error']:.1%} | {repeated['std']:.1%} | {repeated['max_abs_error']:.1%} |")
    write_result(args.out, "\n".join(lines), {"tasks": tasks, "budget": args.budget, "reference": reference,
                                              "repeats": k, "conditions": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
