"""Fleet benchmark: wall time and peak memory of `cutfl simulate SCENARIO` (default: fleet-1000).

Runs the command as a subprocess and samples, every 0.5 s, the resident memory of its whole process tree
(the driver with the ServerApp, Ray's raylet/GCS and the ClientApp actors); prints a markdown summary with
the run's own phase times, uplink bytes and plan counts from its report.

    .venv/bin/python benchmarks/bench_fleet.py [fleet-1000] [--devices N] [--out runs/bench-fleet]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(RSS of the whole tree under `root`, RSS of `root` itself) in KiB."""
    tree, total, stack = _children(), 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss_kib(pid)
        stack.extend(tree.get(pid, []))
    return total, _rss_kib(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="fleet-1000")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench-fleet")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "cutfl", "simulate", args.scenario, "--out", str(args.out), "--quiet"]
    if args.devices:
        cmd += ["--devices", str(args.devices)]
    peak = {"tree": 0, "driver": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CUTFL_NO_PROGRESS": "1"})

    def sample() -> None:
        while proc.poll() is None:
            tree, driver = tree_rss(proc.pid)
            peak["tree"], peak["driver"] = max(peak["tree"], tree), max(peak["driver"], driver)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join(timeout=2)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {stderr.strip().splitlines()[-1] if stderr.strip() else proc.returncode}")
    s = json.loads((args.out / "report.json").read_text())["summary"]
    print(f"## cutfl simulate {args.scenario}" + (f" --devices {args.devices}" if args.devices else "") + "\n")
    print(f"- command: `{' '.join(cmd[1:])}`; date {time.strftime('%Y-%m-%d')}")
    print(f"- machine: {os.cpu_count()} cores, {cpu_model()}; load average at the end {os.getloadavg()[0]:.1f}")
    print(f"- wall time of the whole command: {seconds:.0f} s; federation phases: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items()))
    print(f"- peak RSS: {peak['tree'] / 2**20:.2f} GiB for the process tree (driver + Ray + actors), "
          f"{peak['driver'] / 2**20:.2f} GiB for the driver (ServerApp) alone")
    print(f"- devices: {s['devices_ok']} ok, {s['devices_rejected']} rejected, {s['devices_failed']} failed; "
          f"{s['task_subsets']} task subsets, {s['distinct_plans']} distinct plans, "
          f"{s['compact_models_built']} compact models built; all within budget: {s['all_within_budget']}")
    if s.get("scores_to_dense_bytes"):
        print(f"- scores uplink per device: mean {s['bytes_up_scores']['mean']:.0f} B = "
              f"{100 * s['scores_to_dense_bytes']['mean']:.3f}% of the dense decomposed model "
              f"(max {100 * s['scores_to_dense_bytes']['max']:.3f}%)")
    if s.get("delta_m"):
        print(f"- delta_m: mean {s['delta_m']['mean']:.2f} (min {s['delta_m']['min']:.2f}, "
              f"max {s['delta_m']['max']:.2f})")


if __name__ == "__main__":
    main()
