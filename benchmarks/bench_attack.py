"""Robust aggregation against malicious devices that craft their scores to keep or remove chosen channels.

    .venv/bin/python benchmarks/bench_attack.py [--devices 100] [--malicious 0.1] [--seeds 0,1,2]
        [--evaluate] [--out runs/bench-attack] [--parts scores,inflated,finetune] [--base-model DIR]

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

Two attacks on the trust boundaries of issue 13 (`--parts inflated,finetune`: about 5 minutes on one thread):

- `inflated`: hostile devices send valid-looking inverted scores (each group's own honest values, the
  largest moved to the channel it ranks lowest) and declare 2^62 samples, used and in their profile. Their
  weight is what `server.app.sample_weights` gives them (capped by the scoring request), against what it
  was before (the device's own claim). Figure: the share of the honest devices' no-attack kept channels
  (weighted-mean, the default) that change, over the honest devices' distinct plans, for 1 of the 100
  devices, 10 of 100, and 1 of 5 (the first five devices, the issue's setting).
- `finetune`: real local fine-tuning (client.app's steps: BatchNorm re-estimated on the device's data,
  then `cut.train.finetune` with the scenario's [finetune] recipe) by devices of the default fleet that
  share its largest plan group, from that plan's weights after the server's real recovery
  (`server.recovery.recover_plans`, the scenario's [recovery]; `--recovery-steps 0`: one-shot weights);
  the updates go through the real `server.app.finetune_round` (replies canned, no Flower, no teacher
  gate). One device of the group sends its delta x 10, x 1e6, or scaled to just under the exclusion bound
  (it knows the honest norms), and claims 2^62 examples. Figure: relative L2 distance of the group's
  averaged learnt weights (BN statistics apart) from the attack-free run's (every device honest), against
  the same updates averaged as before issue 13 (plain FedAvg weighted by the claimed examples); `absent`
  is the hostile device simply missing (its honest update lost: the floor no defence removes), and
  "from the honest devices alone" the distance from that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_scores import ROOT, Evaluator, Fleet, flat, kept_change, load_fleet, plan_fleet, unflat, wire  # noqa: E402
from machine import cpu_model  # noqa: E402

from server.aggregate import TaskScores, aggregate, fedavg, is_statistic, normalised  # noqa: E402

HUGE = 2**62  # what a hostile device claims: samples scored, samples held, examples fine-tuned on

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
    fleet = load_fleet(devices=args.devices, base_model=args.base_model, threads=args.threads)
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


# ------------------------------------------------------------------------ inflated sample counts


def inverted(scores: TaskScores) -> TaskScores:
    """Each group's own values, re-assigned so that its lowest-ranked channel gets its largest value."""
    out: TaskScores = {}
    for task, groups in scores.items():
        out[task] = {}
        for g, v in groups.items():
            order = np.argsort(v, kind="stable")
            flipped = np.empty_like(v)
            flipped[order] = np.sort(v)[::-1]
            out[task][g] = flipped
    return out


def claimed_weights(device, most: int, capped: bool) -> dict[str, float]:
    """A hostile device's weight per task: what server.app.sample_weights gives a 2^62 claim (capped), or
    the claim itself (before issue 13: capped only by what the device declared)."""
    from cut.messages import ImportanceReport, TaskProfile
    from server.app import sample_weights
    from server.ledger import DeviceRecord

    record = DeviceRecord(0)
    record.profile = TaskProfile("x", device.tasks, device.device.budget,
                                 samples_per_task={t: HUGE for t in device.tasks})
    record.report = ImportanceReport("x", "m", "a" * 64, {}, {t: HUGE for t in device.tasks})
    return sample_weights(record, most) if capped else {t: float(HUGE) for t in device.tasks}


def inflated_counts(fleet: Fleet, honest: list[TaskScores], seeds: list[int]) -> list[dict]:
    """Share of honest devices' kept channels that change under the inflated-count attack (weighted-mean)."""
    s = fleet.settings.scoring
    most = s.num_batches * s.batch_size
    rows = []
    five = Fleet(fleet.settings, fleet.base, fleet.devices[:5])
    for label, sub, count in (("1 of 100", fleet, 1), ("10 of 100", fleet, 10), ("1 of 5", five, 1)):
        n = len(sub.devices)
        reports = honest[:n]
        reference = plan_fleet(sub, reports, "weighted-mean")
        for seed in seeds:
            bad = set(np.random.default_rng([seed, 13]).choice(n, count, replace=False).tolist())
            good = Fleet(sub.settings, sub.base, [d for i, d in enumerate(sub.devices) if i not in bad])
            attacked = [wire(inverted(r)) if i in bad else r for i, r in enumerate(reports)]
            for capped in (False, True, None):  # None: the hostile devices absent (what no defence removes)
                if capped is None:
                    plans = plan_fleet(good, [r for i, r in enumerate(reports) if i not in bad], "weighted-mean")
                else:
                    devices = [dataclasses.replace(d, weights=claimed_weights(d, most, capped)) if i in bad else d
                               for i, d in enumerate(sub.devices)]
                    plans = plan_fleet(Fleet(sub.settings, sub.base, devices), attacked, "weighted-mean")
                change = kept_change(plans, reference, good)  # over the honest devices' plans only
                kept = sum(len(c) for d in good.devices for c in reference[d.pid].keep.values())
                lost = sum(len(set(c) - set(plans[d.pid].keep.get(g, ()))) for d in good.devices
                           for g, c in reference[d.pid].keep.items())
                rows.append({"setting": label, "seed": seed, "capped": capped,
                             "change": {f"{b:g}": v for b, v in change.items()},
                             "change_per_device": lost / kept})
    return rows


def inflated_table(rows: list[dict]) -> str:
    lines = ["#### inflated sample counts (inverted scores, 2^62 samples claimed; weighted-mean)", "",
             "| hostile devices | weight | changed, distinct honest plans (mean over seeds) | worst seed and budget "
             "| changed, per honest device |", "|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for capped in (False, True, None):
            sel = [r for r in rows if r["setting"] == setting and r["capped"] == capped]
            mean = np.mean([np.mean(list(r["change"].values())) for r in sel])
            worst = max(max(r["change"].values()) for r in sel)
            per_device = np.mean([r["change_per_device"] for r in sel])
            weight = {False: "as claimed (before)", True: "capped by the request (now)",
                      None: "absent (reference: their data lost)"}[capped]
            lines.append(f"| {setting} | {weight} | {100 * mean:.1f}% | {100 * worst:.1f}% | {100 * per_device:.1f}% |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ scaled fine-tune updates


def _learnt(arrays: dict) -> list[str]:
    return [n for n, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not is_statistic(n)]


def _norm(arrays: dict, names: list[str], minus: dict | None = None) -> float:
    return float(np.sqrt(sum(np.sum(np.square(arrays[n].astype(np.float64) - (0 if minus is None else minus[n])))
                             for n in names)))


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over the learnt float arrays (BatchNorm statistics apart)."""
    names = _learnt(b)
    return _norm(a, names, b) / _norm(b, names)


def local_finetune(fleet: Fleet, member, book, plan, seed: int) -> tuple[dict, int]:
    """What client.app's finetune handler does on `member`: adopt the plan's weights (BN re-estimated on my
    samples), K steps of distillation from my dense base on my data; the weights and my example count."""
    import torch

    from client.data import local_data
    from cut.compact import recalibrate_batchnorm
    from cut.importance import take_batches
    from cut.train import finetune, make_loader
    from protocol.records import state_arrays

    settings = fleet.settings
    f, dev = settings.finetune, settings.device
    data = local_data(member.device)
    dense = fleet.base.decomposed(plan.tasks)
    student = book.model(plan.plan_hash)  # the plan's current weights, as delivered
    if dev.recalibrate_bn:
        student = recalibrate_batchnorm(student, take_batches(make_loader(data.train, dev.bn_batch_size, shuffle=False),
                                                              dev.bn_batches))
    torch.manual_seed(seed)
    loader = make_loader(data.train, f.batch_size, shuffle=True, seed=seed)
    finetune(student, dense, loader, steps=f.steps, lr=f.lr, distill_weight=f.distill_weight, progress=False)
    student.eval()
    return state_arrays(student), int(data.num_train)


def server_round(fleet: Fleet, reference: dict, updates: dict[int, tuple[dict, int]]) -> tuple[dict, dict]:
    """The real server.app.finetune_round on canned replies: (the group's adopted weights, node -> reason)."""
    from flwr.app import MetricRecord, RecordDict

    from cut.messages import TaskProfile
    from protocol.records import METRICS, WEIGHTS, arrays_record
    from server import app as server_app
    from server.ledger import Ledger

    replies = {n: SimpleNamespace(content=RecordDict({WEIGHTS: arrays_record(a),
                                                      METRICS: MetricRecord({"num_examples": k})}))
               for n, (a, k) in updates.items()}
    adopted: dict = {}
    book = SimpleNamespace(builds={"p": SimpleNamespace(arrays=reference, weights_sha256="a" * 64)},
                           with_weights=lambda plan_hash, arrays: adopted.update(arrays))
    ledger = Ledger(list(updates))
    for n in updates:
        r = ledger.records[n]
        r.device_id, r.plan_hash, r.weights_sha256 = f"dev-{n}", "p", "a" * 64
        r.profile = TaskProfile(r.device_id, ("seg",), fleet.devices[0].device.budget, samples_per_task={"seg": HUGE})
    real = server_app.exchange
    server_app.exchange = lambda *args, **kwargs: replies
    try:
        settings = dataclasses.replace(fleet.settings, finetune=fleet.settings.finetune.model_copy(update={"rounds": 1}))
        server_app.finetune_round(None, ledger, settings, book, 1)
    finally:
        server_app.exchange = real
    return adopted, {n: r.reason for n, r in ledger.records.items() if not r.ok}


def scaled_finetune(fleet: Fleet, honest: list[TaskScores], seeds: list[int], sizes: list[int],
                    recovery_steps: int | None = None) -> dict:
    """Groups of `sizes` devices of one real plan; one of them scales its delta; see the module docstring."""
    from fleet_scores import options_of

    from server.planning import PlanBook
    from server.recovery import recover_plans

    plans = plan_fleet(fleet, honest, "weighted-mean")
    groups: dict[tuple, list] = {}
    for d in fleet.devices:
        groups.setdefault(d.plan_key, []).append(d)
    members = max(groups.values(), key=len)
    if len(members) < max(sizes):
        raise SystemExit(f"the largest plan group has {len(members)} devices; --group-sizes asks for {max(sizes)}")
    plan = plans[members[0].pid]
    book = PlanBook(fleet.base, options_of(fleet.settings), fleet.settings.planning.normalise)
    book.build(plan)
    recovery = fleet.settings.recovery
    if recovery_steps is not None:
        recovery = recovery.model_copy(update={"steps": recovery_steps})
    started = time.perf_counter()
    recover_plans(book, fleet.base, recovery)  # the server's recovery, as before delivery (steps 0: one-shot)
    recovery_seconds = time.perf_counter() - started
    reference = book.builds[plan.plan_hash].arrays
    names = _learnt(reference)
    rows, spread, seconds = [], [], 0.0
    for seed in seeds:
        rng = np.random.default_rng([seed, 17])
        chosen = [members[i] for i in rng.choice(len(members), max(sizes), replace=False)]
        started = time.perf_counter()
        honest_updates = {i + 1: local_finetune(fleet, m, book, plan, 1000 * seed + m.pid)
                          for i, m in enumerate(chosen)}
        seconds += time.perf_counter() - started
        deltas = {n: _norm(a, names, reference) for n, (a, _) in honest_updates.items()}
        for size in sizes:
            group = {n: honest_updates[n] for n in list(honest_updates)[:size]}
            norms = sorted(deltas[n] for n in group)
            stack = np.stack([np.concatenate([(group[n][0][k].astype(np.float64) - reference[k]).ravel()
                                              for k in names]) for n in group])
            coord = np.median(stack, axis=0)
            spread.append({"seed": seed, "size": size, "max_over_median": norms[-1] / norms[(size - 1) // 2],
                           "min_over_median": norms[0] / norms[(size - 1) // 2],
                           "delta_over_weights": float(np.median(norms)) / _norm(reference, names),
                           "to_coordinate_median": float(np.median(np.linalg.norm(stack - coord, axis=1)
                                                                   / np.linalg.norm(stack, axis=1)))})
            clean, refused = server_round(fleet, reference, group)
            assert not refused, refused  # an honest group is never excluded from (checked, not assumed)
            hostile = 1 + int(rng.integers(size))
            absent, _ = server_round(fleet, reference, {n: u for n, u in group.items() if n != hostile})
            rows.append({"seed": seed, "size": size, "attack": "absent (reference)", "now": relative_distance(absent, clean),
                         "before": relative_distance(absent, clean), "excluded": [], "hostile": hostile,
                         "reason": "", "honest_excluded": [], "to_honest_alone": 0.0})
            median = norms[(size - 1) // 2]
            bound = fleet.settings.finetune.clip_multiple * median
            for label, factor in (("x 10", 10.0), ("x 1e6", 1e6),
                                  ("just under the bound", 0.999 * bound / deltas[hostile])):
                arrays, _ = group[hostile]
                scaled = dict(arrays)
                for k in [n for n, v in reference.items() if np.issubdtype(v.dtype, np.floating)]:
                    scaled[k] = (reference[k] + factor * (arrays[k].astype(np.float64) - reference[k])).astype(
                        reference[k].dtype)
                attacked = dict(group)
                attacked[hostile] = (scaled, HUGE)
                now, reasons = server_round(fleet, reference, attacked)
                before = fedavg([(a, float(k)) for a, k in attacked.values()])
                rows.append({"seed": seed, "size": size, "attack": label, "now": relative_distance(now, clean),
                             "before": relative_distance(before, clean), "excluded": sorted(reasons),
                             "hostile": hostile, "reason": reasons.get(hostile, ""),
                             "honest_excluded": sorted(n for n in reasons if n != hostile),
                             "to_honest_alone": relative_distance(now, absent)})
    return {"rows": rows, "spread": spread, "plan_devices": len(members), "tasks": list(plan.tasks),
            "budget": members[0].device.budget.value, "finetune_seconds": seconds,
            "recovery_steps": recovery.steps, "recovery_seconds": recovery_seconds,
            "recipe": fleet.settings.finetune.model_dump()}


def finetune_table(out: dict) -> str:
    lines = [f"#### scaled fine-tune updates (plan {'+'.join(out['tasks'])} @ {out['budget']:g}, "
             f"{out['plan_devices']} devices share it; server recovery {out['recovery_steps']} steps; "
             f"recipe {out['recipe']})", "",
             "| group | attack | distance from attack-free, now (mean / worst) | before issue 13 (mean) "
             "| from the honest devices alone (mean) | hostile excluded | honest excluded |",
             "|---|---|---|---|---|---|---|"]
    rows = out["rows"]
    for size in dict.fromkeys(r["size"] for r in rows):
        for attack in dict.fromkeys(r["attack"] for r in rows):
            sel = [r for r in rows if r["size"] == size and r["attack"] == attack]
            now = [r["now"] for r in sel]
            lines.append(f"| {size} | {attack} | {100 * np.mean(now):.3f}% / {100 * max(now):.3f}% | "
                         f"{100 * np.mean([r['before'] for r in sel]):.3g}% | "
                         f"{100 * np.mean([r['to_honest_alone'] for r in sel]):.3f}% | "
                         f"{sum(r['hostile'] in r['excluded'] for r in sel)}/{len(sel)} | "
                         f"{sum(len(r['honest_excluded']) for r in sel)} |")
    sp = out["spread"]
    lines += ["", f"Honest deltas: median norm {100 * np.median([x['delta_over_weights'] for x in sp]):.2f}% of the "
              f"weights' norm; largest / median delta norm in a group: max "
              f"{max(x['max_over_median'] for x in sp):.3f} (mean {np.mean([x['max_over_median'] for x in sp]):.3f}); "
              f"smallest / median: min {min(x['min_over_median'] for x in sp):.3f}; an honest delta's distance from "
              f"the coordinate-wise median, over its norm: median "
              f"{np.median([x['to_coordinate_median'] for x in sp]):.3f}. Local fine-tuning: "
              f"{out['finetune_seconds']:.0f} s; server recovery {out['recovery_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--parts", type=lambda t: t.split(","), default=["scores", "inflated", "finetune"],
                    help="scores (crafted scores, every rule), inflated (sample counts), finetune (scaled updates)")
    ap.add_argument("--base-model", default="runs/pretrained-scenes", help="the pre-trained model directory")
    ap.add_argument("--group-sizes", type=lambda t: [int(x) for x in t.split(",") if x], default=[2, 3, 5],
                    help="devices of one plan in the fine-tune attack")
    ap.add_argument("--recovery-steps", type=int, default=None,
                    help="server recovery steps before fine-tuning (default: the scenario's; 0: one-shot)")
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
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "scores" in args.parts:
        out = run(args)
        (Path(args.out) / "results.json").write_text(json.dumps(out, indent=1))
        print(f"{args.devices} devices, {100 * args.malicious:g}% malicious, seeds {args.seeds}; share of the no-attack "
              f"plan's kept channels that the attacked plan drops (same rule), mean over seeds; {out['seconds']:.0f} s; "
              f"{out['cpu']}, {out['cores']} cores\n")
        print(tables(out))
    if {"inflated", "finetune"} & set(args.parts):
        fleet = load_fleet(devices=args.devices, base_model=args.base_model, threads=args.threads)
        honest = [wire(d.scores) for d in fleet.devices]
        trust: dict = {"devices": args.devices, "seeds": args.seeds, "base_model": args.base_model,
                       "cpu": cpu_model(), "cores": os.cpu_count()}
        if "inflated" in args.parts:
            started = time.perf_counter()
            trust["inflated"] = inflated_counts(fleet, honest, args.seeds)
            print(inflated_table(trust["inflated"]))
            print(f"({time.perf_counter() - started:.0f} s)\n")
        if "finetune" in args.parts:
            trust["finetune"] = scaled_finetune(fleet, honest, args.seeds, args.group_sizes, args.recovery_steps)
            print(finetune_table(trust["finetune"]))
        (Path(args.out) / "trust.json").write_text(json.dumps(trust, indent=1))


if __name__ == "__main__":
    main()
