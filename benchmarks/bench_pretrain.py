"""Pre-training benchmark: wall time of `cutfl pretrain --dataset D` with its defaults, and the per-task
test metrics next to a trivial predictor's (majority class, mean depth, mean normal), as a markdown table.

    .venv/bin/python benchmarks/bench_pretrain.py --dataset scenes [--out runs/bench-pretrain-scenes]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)


def run(cmd: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUTFL_NO_PROGRESS": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="scenes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path("runs") / f"bench-pretrain-{args.dataset}"
    cli = [sys.executable, "-m", "cutfl"]
    trained, seconds = run([*cli, "pretrain", "--dataset", args.dataset, "--out", str(out)])
    trivial, _ = run([*cli, "trivial", "--dataset", args.dataset])
    card = json.loads((out / "model.json").read_text())
    print(f"## cutfl pretrain --dataset {args.dataset} (defaults)\n")
    print(f"- machine: {os.cpu_count()} cores, {cpu_model()}; torch threads default")
    print(f"- wall time of the whole command: {seconds:.0f} s (training loop {card['train_seconds']:.0f} s)")
    print(f"- model: {card['config']['backbone']} x{card['config']['width']}, {card['params']:,} params, "
          f"{card['macs'] / 1e6:.1f} M MACs\n")
    print("| task | metric | trained | trivial predictor |")
    print("|---|---|---|---|")
    for task, metrics in trained["metrics"].items():
        for name, value in metrics.items():
            print(f"| {task} | {name} | {value:.2f} | {trivial[task][name]:.2f} |")


if __name__ == "__main__":
    main()
