"""`cutfl simulate [SCENARIO] [--devices N] [--out DIR] [--base-model DIR]`.

Registration only imports argparse; the runner (and with it Flower and Ray) is imported when the command
runs, so `import cut` and `cutfl --help` stay fast and Flower-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def add_commands(sub, parser_class=argparse.ArgumentParser) -> None:
    p = sub.add_parser("simulate", help="simulate a fleet of devices on Flower's simulation engine",
                       description="Run a federated CUT scenario: devices score channel importance on private "
                                   "data, the server builds a compact model per device, devices evaluate it.")
    p.add_argument("scenario", nargs="?", default="default",
                   help="scenario name (default, fleet-1000) or path of a scenario TOML file")
    p.add_argument("--devices", type=_at_least_one, help="number of devices (default: the scenario's)")
    p.add_argument("--out", type=Path, help="report directory (default runs/simulate)")
    p.add_argument("--base-model", type=Path,
                   help="pre-trained model directory (default: the scenario's; pre-trained when missing)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    import os

    if args.quiet:
        os.environ["CUTFL_NO_PROGRESS"] = "1"
    from simulations.runner import run_scenario

    summary = run_scenario(args.scenario, devices=args.devices, out_dir=args.out, base_model_dir=args.base_model)
    keys = ("scenario", "status", "devices_ok", "devices_rejected", "devices_failed", "distinct_plans",
            "all_within_budget", "seconds_total")
    short = {k: summary[k] for k in keys}
    for k in ("delta_m", "scores_to_dense_bytes"):
        short[f"{k}_mean"] = summary[k]["mean"] if summary.get(k) else None
    short["report"] = str(summary.get("report_dir", ""))
    print(json.dumps(short, indent=2))
    if summary["status"] != "ok":
        print(f"cutfl simulate: only {summary['devices_ok']} device(s) completed", file=sys.stderr)
        return 1
    return 0
