"""ONNX Runtime CPU latency of compact models against the dense decomposed model, as a markdown table.

    /work/venv/bin/python benchmarks/bench_onnx_latency.py [--model runs/pretrained-scenes] [--budgets 0.3,0.5,0.7]

For each budget the engine (`cut.pipeline.prune`, method `cut`, no fine-tune) builds a compact model from
the pre-trained model; every model is exported with `cut.export` (parity with torch checked) and timed
with onnxruntime on CPU at batch 1 with one intra-op thread. Models are timed in interleaved rounds
(dense, 0.3, 0.5, ..., dense, 0.3, ...) so drift on a shared machine hits every model alike; each row
pools all its rounds (rounds x runs timed forwards, after warm-up) into one median and IQR.

"speedup / MAC reduction" is (dense ms / compact ms) / (dense MACs / compact MACs): 1.0 means latency
falls exactly as MACs do; below 1 means fixed costs (memory traffic, small-kernel overheads) take a
growing share as the model shrinks.
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

from machine import cpu_model  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scoring_loader(card: dict, samples: int, batch_size: int, seed: int):
    """A few training batches of the model's own dataset: what the importance scores are computed on."""
    from cut.data import get_dataset
    from cut.train import make_loader

    kwargs = dict(card.get("dataset_kwargs", {}))
    kwargs["num_samples"] = samples
    dataset = get_dataset(card["dataset"], "train", **kwargs)
    return make_loader(dataset, batch_size, shuffle=True, seed=seed)


def build_models(args: argparse.Namespace) -> list[dict]:
    """Dense decomposed model first, then one compact model per budget (from cut.pipeline.prune)."""
    from cut.checkpoint import load_model
    from cut.models import count_macs, count_params
    from cut.pipeline import prune

    base, card = load_model(args.model)
    tasks = args.tasks.split(",") if args.tasks else base.task_names
    dense = base.decompose(tasks).eval()
    rows = [{"budget": "dense", "model": dense, "params": count_params(dense), "macs": count_macs(dense), "plan": None}]
    loader = scoring_loader(card, args.num_batches * args.batch_size, args.batch_size, args.seed)
    for budget in args.budgets:
        start = time.perf_counter()
        compact, plan, report = prune(base, tasks, args.budget_kind, budget, method=args.method,
                                      train_loader=loader, num_batches=args.num_batches, seed=args.seed,
                                      base_sha256=card.get("weights_sha256", ""), progress=False)
        print(f"pruned to {args.budget_kind}={budget} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        rows.append({"budget": f"{budget:g}", "model": compact.eval(), "params": report["params"],
                     "macs": report["macs"], "plan": plan.to_dict()})
    for row in rows:
        row["card"] = {"dataset": card.get("dataset"), "dataset_kwargs": card.get("dataset_kwargs", {}),
                       "weights_sha256": card.get("weights_sha256", ""), "plan": row.pop("plan")}
    return rows


def resize(rows: list[dict], size: tuple[int, int]) -> None:
    """Export and time at another input size: the config's input size is what the export traces, and MACs
    are recounted at that size (pruning and scoring happened at the training size)."""
    from dataclasses import replace

    from cut.models import count_macs

    for row in rows:
        row["model"].config = replace(row["model"].config, input_size=tuple(size))
        row["macs"] = count_macs(row["model"], tuple(size))


def export_all(rows: list[dict], out_dir: Path) -> None:
    from cut.export import PARITY_TOLERANCE, check_parity, export_onnx

    for row in rows:
        path = out_dir / f"model-{row['budget']}.onnx"
        sidecar = export_onnx(row["model"], path, card=row["card"])
        row.update(path=path, bytes=sidecar["onnx_bytes"], parity=check_parity(row["model"], path, tol=PARITY_TOLERANCE))


def time_all(rows: list[dict], rounds: int, runs: int, warmup: int, threads: int) -> None:
    from cut.export import measure_latency

    for row in rows:
        row["times"] = []
    for _ in range(rounds):
        for row in rows:
            row["times"] += measure_latency(row["path"], runs=runs, warmup=warmup, threads=threads)["times_ms"]
    for row in rows:
        q1, median, q3 = statistics.quantiles(row["times"], n=4, method="inclusive")
        row.update(median_ms=median, iqr_ms=q3 - q1)


def table(rows: list[dict]) -> str:
    dense = rows[0]
    lines = ["| budget | params ratio | MACs ratio | latency ms (median, IQR) | latency speedup | "
             "speedup / MAC reduction | ONNX bytes | parity max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup = dense["median_ms"] / row["median_ms"]
        mac_reduction = dense["macs"] / row["macs"]
        lines.append(f"| {row['budget']} | {row['params'] / dense['params']:.3f} | {row['macs'] / dense['macs']:.3f} | "
                     f"{row['median_ms']:.3f} ({row['iqr_ms']:.3f}) | {speedup:.2f}x | {speedup / mac_reduction:.2f} | "
                     f"{row['bytes']:,} | {row['parity']:.1e} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/pretrained-scenes"), help="pre-trained model directory")
    parser.add_argument("--tasks", help="comma-separated tasks to keep (default: all of the model's)")
    parser.add_argument("--budgets", default="0.3,0.5,0.7", help="comma-separated budget fractions")
    parser.add_argument("--budget-kind", default="params", choices=["params", "macs"], help="what the budget limits")
    parser.add_argument("--method", default="cut", help="pruning method (cut.methods)")
    parser.add_argument("--num-batches", type=int, default=4, help="scoring batches")
    parser.add_argument("--batch-size", type=int, default=32, help="scoring batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of scoring data order")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model per round (>= 20)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before each round")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--out-dir", type=Path, help="where the ONNX files go (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the rows (without models) as JSON here")
    parser.add_argument("--input-size", help="H,W to export and time at (default: the model's training size); "
                        "the models are fully convolutional, so a camera-sized frame is a valid input")
    args = parser.parse_args(argv)
    if args.input_size:
        try:
            h, w = (int(v) for v in args.input_size.split(","))
            assert h >= 8 and w >= 8
        except (ValueError, AssertionError):
            parser.error(f"--input-size must be H,W (each >= 8), got {args.input_size!r}")
        args.input_size = (h, w)
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    if args.runs < 20:
        parser.error("--runs must be >= 20 (EVALUATION.md)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    rows = build_models(args)
    if args.input_size:
        resize(rows, args.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        export_all(rows, out_dir)
        time_all(rows, args.rounds, args.runs, args.warmup, args.threads)
    command = "python benchmarks/bench_onnx_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import onnxruntime

    print(f"## ONNX Runtime CPU latency of compact models ({args.method}, {args.budget_kind} budgets)\n")
    print(f"- command: `{command.strip()}`")
    print(f"- date: {date.today().isoformat()}; machine: {os.cpu_count()} cores, {cpu_model()}")
    print(f"- onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, batch 1, {args.threads} intra-op thread(s), "
          f"{args.rounds} interleaved rounds x {args.runs} runs after {args.warmup} warm-up runs each")
    size = "x".join(str(v) for v in rows[0]["model"].config.input_size)
    print(f"- model: {args.model} (tasks {','.join(rows[0]['model'].task_names)}), input {size}, no fine-tune; ratios "
          "are to the dense decomposed model (first row)\n")
    print(table(rows))
    if args.json:
        keep = ("budget", "params", "macs", "bytes", "parity", "median_ms", "iqr_ms")
        args.json.write_text(json.dumps([{k: r[k] for k in keep} for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
