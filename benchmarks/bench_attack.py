"""Robust aggregation against malicious devices that craft their scores to keep or remove chosen channels.

    .venv/bin/python benchmarks/bench_attack.py [--devices 100] [--malicious 0.1] [--seeds 0,1,2]
        [--evaluate] [--out runs/bench-attack]

Same fleet and cached honest scores as benchmarks/bench_privacy.py (benchmarks/fleet_scores.py): the
default scenario's fleet with 100 devices, no noise. A share of the devices (10%, drawn per seed) is
malicious. They collude, know every honest report (hence the honest aggregate and ranking) and the
server's per-task normalisation (only how a report distributes its mass matters, so they match an
honest report's total), and report for their own tasks:

- `boost`: all their mass, evenly, on the 10% of each task's channels the honest fleet ranks lowest
  (channels they want kept);
- `suppress`: 10% of each task's channels set to 0 (channels they want removed: those the fleet ranks
  between the top 40% and 50%, which the honest plans mostly keep) and the rest inflated where it hurts
  most: all the mass, evenly, on the next 20% of the ranking, the channels that compete with the targets
  for the budget. (Zeroing alone moves a 10%-minority's mean by at most 10% of a channel's score:
  measured, it changed under 1.1% of kept channels under every rule.)
- `boost within clip`: boost as far as a server clip of 1 x the median norm lets it: in every (task,
  group) as much mass on the targets as keeps the group's norm at the honest median, the rest of the
  mass spread evenly over the other channels.

For each rule (weighted-mean, median, trimmed-mean 0.1 and 0.2, each with and without server_clip 1.0)
the server aggregates and plans exactly as server.app.plan_devices; the figure is the share of the
channels kept by the no-attack plan of the same rule that the attacked plan no longer keeps, over the
distinct (task subset, budget) plans of each budget. `dropout` is the same fleet with the malicious
devices simply absent: the change no defence can remove (those devices' honest data is lost). With
`--evaluate`, the plans of a few rules are also evaluated (one-shot delta_m, fleet mean).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_scores import ROOT, Evaluator, Fleet, flat, kept_change, load_fleet, plan_fleet, unflat, wire  # noqa: E402
from machine import cpu_model  # noqa: E402

from server.aggregate import TaskScores, aggregate, normalised  # noqa: E402

RULES = {
    "weighted-mean": ("weighted-mean", {}),
    "weighted-mean + clip": ("weighted-mean", {"server_clip": 1.0}),
    "median": ("median", {}),
    "median + clip": ("median", {"server_clip": 1.0}),
    "trimmed-mean 0.1": ("trimmed-mean", {"trim_fraction": 0.1}),
    "trimmed-mean 0.1 + clip": ("trimmed-mean", {"trim_fraction": 0.1, "server_clip": 1.0}),
    "trimmed-mean 0.2": ("trimmed-mean", {"trim_fraction": 0.2}),
    "trimmed-mean 0.2 + clip": ("trimmed-mean", {"trim_fraction": 0.2, "server_clip": 1.0}),
}
ATTACKS = ("dropout", "boost", "suppress", "boost within clip")
TARGET_SHARE = 0.1


def honest_aggregate(fleet: Fleet, reports: list[TaskScores]) -> TaskScores:
    return aggregate([(r, d.weights) for r, d in zip(reports, fleet.devices, strict=True)], "weighted-mean")


def targets(agg: TaskScores, start: float) -> dict[str, np.ndarray]:
    """task -> mask of TARGET_SHARE of its channels, from rank `start` (a share, 0 = the honest aggregate's
    best channel) down; start 1 - TARGET_SHARE gives the lowest-ranked ones."""
    out = {}
    for task, groups in agg.items():
        vec = flat(groups)
        order = np.argsort(-vec, kind="stable")
        first = int(round(start * vec.size))
        mask = np.zeros(vec.size, dtype=bool)
        mask[order[first:first + max(1, int(TARGET_SHARE * vec.size))]] = True
        out[task] = mask
    return out


def group_median_norms(fleet: Fleet, reports: list[TaskScores]) -> dict[tuple[str, str], float]:
    norms: dict[tuple[str, str], list[float]] = {}
    for r in reports:
        for task, groups in normalised(r).items():
            for g, v in groups.items():
                norms.setdefault((task, g), []).append(float(np.linalg.norm(v)))
    return {k: float(np.median(v)) for k, v in norms.items()}


def craft(attack: str, own: TaskScores, low: dict, competitors: dict, medians: dict) -> TaskScores:
    out: TaskScores = {}
    for task, groups in own.items():
        honest = flat(groups)
        total = honest.sum()
        if attack == "suppress":
            vec = competitors[task].astype(np.float64)
        elif attack == "boost":
            vec = low[task].astype(np.float64)
        else:
            vec = _boost_within(low[task], groups, task, medians)
        out[task] = unflat(vec * (total / vec.sum()), groups)
    return out


def _boost_within(mask: np.ndarray, like: dict, task: str, medians: dict) -> np.ndarray:
    """Mass (total 1, as the server normalises) on the targets of each group up to the group's median
    norm; what is left spread evenly over the other channels."""
    parts = unflat(mask.astype(np.float64), like)
    on = {g: (medians[(task, g)] / np.sqrt(m.sum())) * m if m.sum() else 0 * m for g, m in parts.items()}
    vec = flat(on)
    if vec.sum() >= 1.0:
        return vec / vec.sum()
    rest = ~mask
    return vec + rest * (1.0 - vec.sum()) / max(1, rest.sum())


def run(args: argparse.Namespace) -> dict:
    fleet = load_fleet(devices=args.devices, threads=args.threads)
    honest = [wire(d.scores) for d in fleet.devices]
    agg = honest_aggregate(fleet, honest)
    low, high = targets(agg, 1.0 - TARGET_SHARE), targets(agg, 0.4)
    competitors = {t: targets(agg, 0.5)[t] | targets(agg, 0.5 + TARGET_SHARE)[t] for t in agg}
    medians = group_median_norms(fleet, honest)
    started = time.perf_counter()
    references = {name: plan_fleet(fleet, honest, rule, **kw) for name, (rule, kw) in RULES.items()}
    rows = []
    attacked_plans: dict[tuple[str, str, int], dict] = {}
    for seed in args.seeds:
        rng = np.random.default_rng([seed, 99])
        bad = set(rng.choice(len(fleet.devices), int(round(args.malicious * len(fleet.devices))), replace=False).tolist())
        for attack in ATTACKS:
            if attack == "dropout":
                keep = [i for i in range(len(fleet.devices)) if i not in bad]
                sub = Fleet(fleet.settings, fleet.base, [fleet.devices[i] for i in keep])
                reports, plan_of = [honest[i] for i in keep], sub
            else:
                reports = [wire(craft(attack, honest[i], low, competitors, medians)) if i in bad else honest[i]
                           for i in range(len(fleet.devices))]
                plan_of = fleet
            for name, (rule, kw) in RULES.items():
                plans = plan_fleet(plan_of, reports, rule, **kw)
                reference = {d.pid: references[name][d.pid] for d in plan_of.devices}
                change = kept_change(plans, reference, plan_of)
                rows.append({"seed": seed, "attack": attack, "rule": name,
                             "change": {f"{b:g}": v for b, v in change.items()},
                             "targets": _target_effect(plans, plan_of, attack, low, high),
                             "targets_no_attack": _target_effect(reference, plan_of, attack, low, high)})
                if seed == args.seeds[0]:
                    attacked_plans[(attack, name, seed)] = plans
    out = {"rows": rows, "seconds": time.perf_counter() - started,
           "malicious": args.malicious, "devices": args.devices, "seeds": args.seeds,
           "cpu": cpu_model(), "cores": os.cpu_count()}
    if args.evaluate:
        evaluator = Evaluator(fleet, test_samples=args.test_samples)
        out["delta_m"] = {}
        for name in args.evaluate_rules:
            out["delta_m"][f"no attack|{name}"] = evaluator.fleet_delta(references[name])["mean"]
            for attack in ("boost", "suppress", "boost within clip"):
                plans = attacked_plans[(attack, name, args.seeds[0])]
                out["delta_m"][f"{attack}|{name}"] = evaluator.fleet_delta(plans)["mean"]
            evaluator.save()
            print(f"evaluated {name}", file=sys.stderr, flush=True)
    return out


def _target_effect(plans, fleet: Fleet, attack: str, low: dict, high: dict) -> float | None:
    """Share of the attack's target channels that `plans` keep, over the distinct plans (None: dropout)."""
    if attack == "dropout":
        return None
    masks = high if attack == "suppress" else low
    kept = total = 0
    seen = set()
    for d in fleet.devices:
        if d.plan_key in seen:
            continue
        seen.add(d.plan_key)
        plan = plans[d.pid]
        for task in d.tasks:
            groups = d.scores[task]
            mask = unflat(masks[task].astype(np.float64), groups)
            for g, m in mask.items():
                idx = np.flatnonzero(m > 0.5)
                if g in plan.keep and idx.size:
                    kept += len(set(idx.tolist()) & set(plan.keep[g]))
                    total += idx.size
    return kept / total if total else None


def tables(out: dict) -> str:
    budgets = list(out["rows"][0]["change"])
    lines = []
    for attack in ATTACKS:
        lines += [f"#### {attack}", "",
                  "| rule | " + " | ".join(f"changed @ {b}" for b in budgets) + " | mean | max over seeds |"
                  + (" targets kept (no attack -> attack) |" if attack != "dropout" else ""),
                  "|---|" + "---|" * (len(budgets) + 2) + ("---|" if attack != "dropout" else "")]
        for rule in RULES:
            rows = [r for r in out["rows"] if r["attack"] == attack and r["rule"] == rule]
            per_b = [np.mean([r["change"][b] for r in rows]) for b in budgets]
            worst = max(max(r["change"].values()) for r in rows)
            cells = " | ".join(f"{100 * v:.1f}%" for v in per_b)
            tail = ""
            if attack != "dropout":
                tail = (f" {100 * np.mean([r['targets_no_attack'] for r in rows]):.1f}% -> "
                        f"{100 * np.mean([r['targets'] for r in rows]):.1f}% |")
            lines.append(f"| {rule} | {cells} | {100 * np.mean(per_b):.1f}% | {100 * worst:.1f}% |{tail}")
        lines.append("")
    if out.get("delta_m"):
        lines += ["#### fleet mean delta_m (one-shot, first seed)", "",
                  "| rule | no attack | boost | suppress | boost within clip |", "|---|---|---|---|---|"]
        rules = list(dict.fromkeys(k.split("|")[1] for k in out["delta_m"]))
        for rule in rules:
            cells = [out["delta_m"].get(f"{a}|{rule}") for a in ("no attack", "boost", "suppress", "boost within clip")]
            lines.append(f"| {rule} | " + " | ".join(f"{c:+.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--malicious", type=float, default=0.1, help="share of malicious devices")
    ap.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",") if x], default=[0, 1, 2])
    ap.add_argument("--evaluate", action="store_true", help="also evaluate delta_m of some rules' plans")
    ap.add_argument("--evaluate-rules", type=lambda t: t.split(","),
                    default=["weighted-mean", "trimmed-mean 0.2 + clip"])
    ap.add_argument("--test-samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-attack"))
    args = ap.parse_args(argv)
    out = run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(out, indent=1))
    print(f"{args.devices} devices, {100 * args.malicious:g}% malicious, seeds {args.seeds}; share of the no-attack "
          f"plan's kept channels that the attacked plan drops (same rule), mean over seeds; {out['seconds']:.0f} s; "
          f"{out['cpu']}, {out['cores']} cores\n")
    print(tables(out))


if __name__ == "__main__":
    main()
