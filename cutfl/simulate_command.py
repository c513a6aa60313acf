"""`cutfl simulate [SCENARIO] [--devices N] [--out DIR] [--base-model DIR] [privacy and robustness flags]`.

Privacy and robustness flags override the scenario's [scoring] keys: `--clip-norm`, `--noise-multiplier`
or `--epsilon` (a target epsilon at scoring.dp_delta; the noise multiplier is derived by server.privacy for
the device holding the most tasks; with the scenario's secure aggregation on it selects distributed DP,
`[scoring] privacy = "distributed"`, noise shared out among the devices inside SecAgg+), `--aggregation`, `--trim-fraction`, `--server-clip`. `--print-schema`
prints the scenario file's JSON schema (server.settings).

Registration only imports argparse; the runner (and with it Flower and Ray) is imported when the command
runs, so `import cut` and `cutfl --help` stay fast and Flower-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cutfl.args import float_in, int_at_least

AGGREGATIONS = ("weighted-mean", "median", "trimmed-mean")  # server.settings.AGGREGATIONS (not imported: fast)
SCORING_FLAGS = ("clip_norm", "noise_multiplier", "epsilon", "aggregation", "trim_fraction", "server_clip")


_non_negative = float_in(0.0)
_positive = float_in(0.0, low_open=True)
_trim = float_in(0.0, 0.5)


def add_commands(sub, parser_class=argparse.ArgumentParser) -> None:
    p = sub.add_parser("simulate", help="simulate a fleet of devices on Flower's simulation engine",
                       description="Run a federated CUT scenario: devices score channel importance on private "
                                   "data, the server builds a compact model per device, devices evaluate it.")
    p.add_argument("scenario", nargs="?", default="default",
                   help="scenario name (default, fleet-1000) or path of a scenario TOML file")
    p.add_argument("--devices", type=int_at_least(1), help="number of devices (default: the scenario's)")
    p.add_argument("--out", type=Path, help="report directory (default runs/simulate)")
    p.add_argument("--base-model", type=Path,
                   help="pre-trained model directory (default: the scenario's; pre-trained when missing)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--oracle", action="store_true",
                   help="also make the same plans from all devices' pooled scoring data and report the federation's "
                        "gap to that oracle (simulation only; recovers every plan a second time)")
    p.add_argument("--print-schema", action="store_true",
                   help="print the JSON schema of a scenario file (every section, key, type and default) and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue the federation kept in OUT/state (devices that reported do not score again)")
    dp = p.add_argument_group("privacy of the scores (device side; see docs/FEDERATION.md)")
    dp.add_argument("--clip-norm", type=_non_negative, metavar="C",
                    help="clip each task's score vector to this L2 norm on the device (0 = off)")
    noise = dp.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=_non_negative, metavar="Z",
                       help="Gaussian noise std = Z x clip norm on every score (needs --clip-norm or the "
                            "scenario's clip_norm)")
    noise.add_argument("--epsilon", type=_positive, metavar="EPS",
                       help="target epsilon per device at scoring.dp_delta: picks the noise multiplier (needs a "
                            "clip norm); with the scenario's secure aggregation on: distributed DP (central "
                            "epsilon of the secure sums, every release counted)")
    robust = p.add_argument_group("aggregation on the server")
    robust.add_argument("--aggregation", choices=AGGREGATIONS, help="per-task rule across devices")
    robust.add_argument("--trim-fraction", type=_trim, metavar="F",
                        help="trimmed-mean: share of devices dropped at each end, per channel, in [0, 0.5)")
    robust.add_argument("--server-clip", type=_non_negative, metavar="K",
                        help="clip each device's vector to K x the median norm (per task and group; 0 = off)")
    p.set_defaults(func=cmd_simulate)


def epsilon_overrides(scenario: str, devices: int | None, scoring: dict) -> dict:
    """`--epsilon` with the scenario's secure aggregation on selects distributed DP: the central noise
    multiplier for that epsilon at dp_delta, for the device holding the most tasks, after this run's
    release and the scenario's dp_prior_releases (server.privacy). Without secure aggregation it stays a
    local-DP target (simulations.scenario)."""
    if scoring.get("epsilon") is None:
        return scoring
    from server.privacy import distributed_noise_for_epsilon
    from simulations.scenario import fleet_max_tasks, load_scenario

    loaded = load_scenario(scenario, devices=devices)
    s = loaded.settings.scoring
    if not s.secure_aggregation:
        return scoring
    if scoring.get("clip_norm"):
        raise ValueError("--epsilon with secure aggregation is distributed DP, which clips with [scoring] dp_clip: "
                         "drop --clip-norm")
    out = {k: v for k, v in scoring.items() if k != "epsilon"}
    out["privacy"] = "distributed"
    out["dp_noise_multiplier"] = distributed_noise_for_epsilon(float(scoring["epsilon"]), fleet_max_tasks(loaded.fleet),
                                                               s.dp_delta, s.dp_prior_releases + 1)
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    import os

    if args.print_schema:
        from server.settings import scenario_schema

        print(json.dumps(scenario_schema(), indent=2))
        return 0
    if args.quiet:
        os.environ["CUTFL_NO_PROGRESS"] = "1"
    from simulations.runner import run_scenario

    scoring = {k: getattr(args, k) for k in SCORING_FLAGS if getattr(args, k, None) is not None}
    scoring = epsilon_overrides(args.scenario, args.devices, scoring)
    summary = run_scenario(args.scenario, devices=args.devices, out_dir=args.out, base_model_dir=args.base_model,
                           scoring=scoring, resume=args.resume, oracle=args.oracle)
    keys = ("scenario", "status", "devices_ok", "devices_rejected", "devices_failed", "distinct_plans",
            "all_within_budget", "seconds_total")
    short = {k: summary[k] for k in keys}
    for k in ("delta_m", "uplink_to_dense_bytes", "scores_to_dense_bytes"):
        short[f"{k}_mean"] = summary[k]["mean"] if summary.get(k) else None
    if summary.get("delta_m") and summary["delta_m"].get("ci95") is not None:
        short["delta_m_ci95"] = summary["delta_m"]["ci95"]
    short["delta_m_by_budget"] = {k: round(v["mean"], 2) for k, v in (summary.get("delta_m_by_budget") or {}).items()
                                  if v}
    if summary.get("latency_error_measured"):  # latency budgets: measured on the devices / asked - 1
        short["latency_error_measured_median"] = summary["latency_error_measured"]["median"]
    if summary.get("oracle"):
        short["oracle_gap_mean"] = summary["oracle"]["gap_mean"]
    privacy = summary.get("privacy") or {}
    short["dp_mode"] = privacy.get("mode")
    short["dp_epsilon"] = privacy.get("epsilon")
    short["report"] = str(summary.get("report_dir", ""))
    print(json.dumps(short, indent=2))
    if summary["status"] != "ok":
        print(f"cutfl simulate: only {summary['devices_ok']} device(s) completed", file=sys.stderr)
        return 1
    return 0
