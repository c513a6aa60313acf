"""Differential privacy of the scores: fleet mean delta_m against the epsilon each device spends.

    .venv/bin/python benchmarks/bench_privacy.py [--devices 100] [--epsilons 1,2,4,8] [--seeds 0,1,2]
        [--test-samples 200] [--out runs/bench-privacy] [--plot benchmarks/results/privacy_delta_m_vs_epsilon.png]

The fleet is the default scenario's with 100 devices (scenes; random task subsets of seg/depth/normals;
params budgets 0.3/0.5/0.7). Each device's honest normalised scores come from the real device code and
are cached (benchmarks/fleet_scores.py). Per configuration, every device's report goes through the real
`client.scoring.privatise` (clip to C, Gaussian noise of std z C, clamp at 0) and the float16 wire; the
server aggregates (weighted mean) and plans exactly as `server.app.plan_devices`; every distinct plan is
evaluated one-shot, with BatchNorm re-estimation, on a shared test set; a device's delta_m is its plan's.

epsilon is per device at delta 1e-5 for a device holding all 3 tasks (the worst device: what the report
states), from server.privacy's RDP accountant; z is the smallest noise multiplier reaching it.

Rows (modes):
- `local`: the device code as it is (user-level local DP), clip C = the fleet's median per-task norm, and
  C / 4 and 4 C at epsilon 2 (does the clip norm matter?); several noise seeds;
- `local, scores^0.25` (benchmark-only variant, not in the device code): each score raised to the power
  0.25 before privatise, the aggregate raised to 4 after (a variance-stabilising transform for fisher
  scores, whose mass sits in a few channels);
- `distributed` (benchmark-only, emulating secure aggregation with scaled shares): each of the n devices
  of a task adds noise z C / sqrt(n) to an unclamped share, the server sees only the sum (noise z C);
  epsilon is then the *central* epsilon of the sums, not a local guarantee;
- references: no noise; a plan from no information (every channel scored equal, so only costs decide);
  the server's own fisher scores on 4 batches of 32 of its pre-training data (no device data at all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_scores import (  # noqa: E402  (benchmarks/ on sys.path)
    ROOT,
    Evaluator,
    Fleet,
    flat,
    kept_change,
    load_fleet,
    options_of,
    plan_fleet,
    private_reports,
    unflat,
    wire,
)
from machine import cpu_model  # noqa: E402

from client.scoring import distributed_share, mean_one, privatise  # noqa: E402
from cut.data import get_dataset  # noqa: E402
from cut.importance import score_tasks  # noqa: E402
from cut.messages import PrivacySettings  # noqa: E402
from cut.train import evaluate, make_loader, multitask_delta  # noqa: E402
from protocol.layout import TRANSFORMS, DistributedNoise, Layout  # noqa: E402
from server.aggregate import TaskScores, aggregate, personalise  # noqa: E402
from server.planning import PlanBook  # noqa: E402
from server.privacy import distributed_noise_for_epsilon, local_epsilon, noise_for_epsilon  # noqa: E402
from server.recovery import recover_plans  # noqa: E402
from server.secagg import private_mean  # noqa: E402

DELTA = 1e-5
TASKS = 3  # the worst device holds all three tasks


def power(scores: TaskScores, p: float) -> TaskScores:
    return {t: {g: (np.asarray(v, dtype=np.float64) ** p).astype(np.float32) for g, v in groups.items()}
            for t, groups in scores.items()}


def median_norm(fleet: Fleet, p: float = 1.0) -> float:
    return float(np.median([np.linalg.norm(flat(power(d.scores, p)[t])) for d in fleet.devices for t in d.tasks]))


def local_aggregate(fleet: Fleet, clip: float, z: float, seed: int, p: float = 1.0) -> TaskScores:
    """Weighted mean of privatised reports; with p != 1 the devices privatise scores^p and the server
    takes the aggregate to the power 1/p (post-processing)."""
    if p == 1.0:
        reports = private_reports(fleet, clip, z, seed)
    else:
        privacy = PrivacySettings(clip_norm=clip, noise_multiplier=z)
        reports = [wire(privatise(power(d.scores, p), privacy, np.random.default_rng([seed, d.pid])))
                   for d in fleet.devices]
    agg = aggregate([(r, d.weights) for r, d in zip(reports, fleet.devices, strict=True)], "weighted-mean")
    return agg if p == 1.0 else power(agg, 1.0 / p)


def shrink(values: np.ndarray, like: dict, noise_var: dict[str, float] | float) -> dict[str, np.ndarray]:
    """Empirical-Bayes shrinkage of a noisy score vector towards each group's mean (post-processing: it
    uses only the released values and the noise variance). Per group g: lambda = max(0, var_g - s2) /
    var_g, estimate = mean_g + lambda (value - mean_g), so a group whose channel differences are
    indistinguishable from the noise keeps only its mean, which averages the noise over its channels."""
    out = {}
    for g, v in unflat(values, like).items():
        v = v.astype(np.float64)
        s2 = noise_var[g] if isinstance(noise_var, dict) else noise_var
        var = float(v.var())
        lam = max(0.0, var - s2) / var if var > 0 else 0.0
        out[g] = v.mean() + lam * (v - v.mean())
    return out


def distributed_aggregate(fleet: Fleet, clip: float, z: float, seed: int, p: float = 1.0,
                          denoise: bool = False) -> TaskScores:
    """Secure-aggregation sums with noise z C in total: shares of std z C / sqrt(n_t), not clamped; the
    server (optionally) shrinks the noisy sums with the known noise variance (z C)^2 per coordinate, then
    clamps at 0 and undoes the power p."""
    rng = np.random.default_rng([seed, 7])
    clipped = [privatise(power(d.scores, p), PrivacySettings(clip_norm=clip)) for d in fleet.devices]
    out: TaskScores = {}
    for task in fleet.base.task_names:
        holders = [i for i, d in enumerate(fleet.devices) if task in d.tasks]
        like = clipped[holders[0]][task]
        share = z * clip / math.sqrt(len(holders))
        total = sum(flat(clipped[i][task]) + rng.normal(0.0, share, size=len(flat(like))) for i in holders)
        est = shrink(total, like, (z * clip) ** 2) if denoise else unflat(total, like, np.float64)
        out[task] = {g: (np.maximum(v, 0.0) ** (1.0 / p)).astype(np.float32) for g, v in est.items()}
    return out


def denoised_local(fleet: Fleet, clip: float, z: float, seed: int, p: float) -> TaskScores:
    """local_aggregate, but the server shrinks the weighted mean; the noise variance of the mean is
    estimated per group from the spread of the individual reports (which plain mode sees)."""
    privacy = PrivacySettings(clip_norm=clip, noise_multiplier=z)
    reports = [normalised_reports(wire(privatise(power(d.scores, p), privacy, np.random.default_rng([seed, d.pid]))))
               for d in fleet.devices]
    out: TaskScores = {}
    for task in fleet.base.task_names:
        rows = [(flat(r[task]), d.weights[task]) for r, d in zip(reports, fleet.devices, strict=True) if task in r]
        like = next(r[task] for r in reports if task in r)
        x = np.stack([v for v, _ in rows])
        w = np.array([w for _, w in rows]) / sum(w for _, w in rows)
        mean = (w[:, None] * x).sum(0)
        var_of_mean = ((w[:, None] ** 2) * (x - mean) ** 2).sum(0)
        noise = {g: float(v.mean()) for g, v in unflat(var_of_mean, like).items()}
        est = shrink(mean, like, noise)
        out[task] = {g: (np.maximum(v, 0.0) ** (1.0 / p)).astype(np.float32) for g, v in est.items()}
    return out


def product_layout(fleet: Fleet, z: float, transform: str, clip: float = 1.0) -> Layout:
    """The layout server.secagg sends under `[scoring] privacy = "distributed"` with every device of the
    fleet in the release (n_min = n) and dp_clip `clip`."""
    settings = fleet.settings
    n = len(fleet.devices)
    dp = DistributedNoise(transform if transform in TRANSFORMS else "none", clip, z * clip / math.sqrt(n), n)
    tasks = fleet.base.task_names
    scale = float(settings.scoring.num_batches * settings.scoring.batch_size)
    return Layout.of(fleet.base.task_groups(tasks), fleet.base.analysis(tasks).sizes, scale, dp)


def rank_encode(scores: TaskScores, layout: Layout) -> TaskScores:
    """Benchmark-only transform: each task's channels replaced by their rank over the task (1 = lowest,
    ties averaged), scaled to norm 1: every vector has the same norm, so nothing is clipped."""
    out: TaskScores = {}
    for task, groups in scores.items():
        names = list(groups)
        ranks = rankdata(np.concatenate([np.asarray(groups[g], dtype=np.float64) for g in names]))  # ties: average
        ranks *= layout.dp.clip / np.linalg.norm(ranks)
        out[task] = unflat(ranks, groups, np.float64)
    return out


def blocks_of(fleet: Fleet, size: int, order: str) -> dict[str, list[np.ndarray]]:
    """group -> list of channel-index arrays, blocks of `size` channels: consecutive indices ('index') or
    consecutive in the order of the public pre-trained weights' magnitude ('public', data-free)."""
    base = fleet.base
    sizes = base.analysis(base.task_names).sizes
    public = {}
    if order == "public":
        mags = score_tasks(base.model.eval(), None, list(base.task_names), "magnitude", 0, 0)
        for groups in mags.values():
            public.update({g: np.asarray(v, dtype=np.float64) for g, v in groups.items()})
    out = {}
    for g, n in sizes.items():
        idx = np.argsort(-public[g], kind="stable") if order == "public" else np.arange(n)
        step = size if size > 0 else n  # 0: the whole group is one unit
        out[g] = [idx[i:i + step] for i in range(0, n, step)]
    return out, public


def product_aggregate(fleet: Fleet, z: float, seed: int, transform: str = "fourth-root", shrinkage: bool = True,
                      block: int = 1, order: str = "index", clip: float = 1.0) -> TaskScores:
    """The product's distributed DP path, in process: each device's real encode (protocol.layout), flatten and
    noise share (client.scoring.distributed_share, seeded here per (seed, device)), the sum SecAgg+ would
    unmask (exact up to its quantisation), and the server's real private_mean (server.secagg).

    block != 1 (benchmark-only coarser units; 0 = one unit per channel group): each device releases, per
    block B of `block` channels, the
    value sum(u_B) / sqrt(|B|) (by Cauchy-Schwarz the vector's norm stays <= the clip, so the noise is the
    same); the server gives every channel its block's mean and breaks ties inside a block by the public
    pre-trained weights' magnitude (post-processing with public information)."""
    layout = product_layout(fleet, z, transform, clip)
    dp = layout.dp
    channels = {t: layout.channels(t) for t in layout.task_names}
    partition, public = blocks_of(fleet, block, order) if block != 1 else (None, {})
    if partition is not None:  # the released layout has one coordinate per block
        sizes = {g: len(bs) for g, bs in partition.items()}
        released = Layout.of({t: [g for g, _ in groups] for t, groups in layout.tasks}, sizes, layout.weight_scale,
                             dp)
    else:
        released = layout
    total = np.zeros(released.size)
    for d in fleet.devices:
        u = rank_encode(d.scores, layout) if transform == "rank" else dp.encode(d.scores, channels)
        if partition is not None:
            u = {t: {g: np.array([v[b].sum() / math.sqrt(len(b)) for b in partition[g]]) for g, v in groups.items()}
                 for t, groups in u.items()}
        weights = {t: min(1.0, d.weights[t] / layout.weight_scale) for t in u}
        vector = distributed_share(released.flatten(u, weights), released.score_size, dp.share_std,
                                   np.random.default_rng([seed, d.pid]))
        total += np.clip(vector, -released.clipping_range, released.clipping_range)
    linear = dataclasses.replace(released, dp=dataclasses.replace(dp, transform="none"))
    if transform == "rank":  # decode: the mean rank itself (clamped), after the same shrinkage
        return private_mean(linear, total, len(fleet.devices), shrinkage)
    if partition is None:
        return private_mean(released, total, len(fleet.devices), shrinkage)
    # Blocks: the clamped, shrunk mean of each block's value (up to one factor per task), then each
    # channel's u = value / sqrt(|B|), then the inverse power.
    out = private_mean(linear, total, len(fleet.devices), shrinkage)
    full: TaskScores = {}
    for task, groups in out.items():
        full[task] = {}
        for g, per_block in groups.items():
            values = np.zeros(sum(len(b) for b in partition[g]))
            for value, b in zip(per_block, partition[g], strict=True):
                values[b] = (float(value) / math.sqrt(len(b))) ** (1.0 / dp.power)
            tie = public[g] / (public[g].max() or 1.0) if order == "public" else np.zeros_like(values)
            full[task][g] = values * (1.0 + 1e-3 * tie)
        total_task = sum(float(v.sum()) for v in full[task].values()) or 1.0
        full[task] = {g: (v / total_task).astype(np.float32) for g, v in full[task].items()}
    return full


def recovered_delta(fleet: Fleet, evaluator: Evaluator, aggregated: TaskScores, steps: int, cache: Path
                    ) -> dict[str, float]:
    """The fleet's delta_m after the server's default recovery (server.recovery.recover_plans with the
    scenario's [recovery] settings, `steps` steps per plan), each distinct plan evaluated on the shared test
    set as delivered (no BatchNorm re-estimation: the devices' default). Cached per plan hash and steps."""
    settings = fleet.settings
    book = PlanBook(fleet.base, options_of(settings), settings.planning.normalise)
    plans = {}
    for d in fleet.devices:
        plans[d.pid] = book.plan(d.tasks, d.device.budget, personalise(aggregated, None, d.tasks, 0.0),
                                 d.device.priorities, d.plan_key)
        book.build(plans[d.pid])  # the compact model recover_plans trains
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if any(f"{p.plan_hash}|{steps}" not in done for p in plans.values()):
        recover_plans(book, fleet.base, settings.recovery.model_copy(update={"steps": steps}))
        for plan_hash in book.builds:
            key = f"{plan_hash}|{steps}"
            if key not in done:
                model = book.model(plan_hash).eval()
                tasks = book.builds[plan_hash].plan.tasks
                done[key] = multitask_delta(fleet.base.model, evaluate(model, evaluator._test, list(tasks)),
                                            evaluator.dense(tasks))
        cache.write_text(json.dumps(done))
    per_budget: dict[float, list[float]] = {}
    for d in fleet.devices:
        per_budget.setdefault(d.device.budget.value, []).append(done[f"{plans[d.pid].plan_hash}|{steps}"])
    out = {"mean": float(np.mean([v for vs in per_budget.values() for v in vs]))}
    out.update({f"{b:g}": float(np.mean(vs)) for b, vs in sorted(per_budget.items())})
    return out


def normalised_reports(report: TaskScores) -> TaskScores:
    """What server.aggregate does to each report first: per-task normalisation."""
    from cut.fusion import normalise

    return normalise(report, "global")


def server_scores(fleet: Fleet) -> TaskScores:
    """The server's own per-task fisher scores on its pre-training data (no device data)."""
    card = fleet.base.card
    kwargs = card.get("dataset_kwargs", {})
    train = get_dataset(card["dataset"], "train", num_samples=128, size=kwargs.get("size", 64),
                        seed=kwargs.get("seed", 0))
    model = fleet.base.model.eval()
    tasks = list(fleet.base.task_names)
    return mean_one(score_tasks(model, make_loader(train, 32, shuffle=True, seed=0), tasks, "fisher", 4, 0))


def group_means(fleet: Fleet, p: float) -> TaskScores:
    """No noise, but every channel gets its group's mean (scores^p summed over devices): what shrinkage
    converges to when the noise hides every difference between the channels of a group."""
    out: TaskScores = {}
    for task in fleet.base.task_names:
        vectors = [power(d.scores, p)[task] for d in fleet.devices if task in d.tasks]
        total = {g: sum(v[g].astype(np.float64) for v in vectors) for g in vectors[0]}
        out[task] = {g: (np.full_like(v, v.mean()) ** (1.0 / p)).astype(np.float32) for g, v in total.items()}
    return out


def uniform_scores(fleet: Fleet) -> TaskScores:
    like = next(d for d in fleet.devices if len(d.tasks) == 3).scores
    return {t: {g: np.ones_like(v) for g, v in groups.items()} for t, groups in like.items()}


# variant -> (transform, block size, block order, shrinkage, dp_clip) of the product's distributed path
PRODUCT_VARIANTS = {
    "default (fourth-root, clip 0.1)": ("fourth-root", 1, "index", True, 0.1),
    "sqrt, clip 0.1": ("sqrt", 1, "index", True, 0.1),
    "rank, clip 0.1": ("rank", 1, "index", True, 0.1),
    "fourth-root, clip 0.1, blocks of 8 (index order)": ("fourth-root", 8, "index", True, 0.1),
    "fourth-root, clip 0.1, blocks of 8 (public weight order)": ("fourth-root", 8, "public", True, 0.1),
    "fourth-root, clip 0.1, one unit per group (public weight order within)": ("fourth-root", 0, "public", True, 0.1),
    "fourth-root": ("fourth-root", 1, "index", True, 1.0),
    "fourth-root, clip 0.7": ("fourth-root", 1, "index", True, 0.7),
    "fourth-root, clip 0.5": ("fourth-root", 1, "index", True, 0.5),
    "fourth-root, no shrinkage": ("fourth-root", 1, "index", False, 1.0),
    "sqrt": ("sqrt", 1, "index", True, 1.0),
    "no transform, clip 5": ("none", 1, "index", True, 5.0),
    "rank": ("rank", 1, "index", True, 1.0),
    "fourth-root, blocks of 8 (index order)": ("fourth-root", 8, "index", True, 1.0),
    "fourth-root, blocks of 8 (public weight order)": ("fourth-root", 8, "public", True, 1.0),
    "fourth-root, blocks of 32 (public weight order)": ("fourth-root", 32, "public", True, 1.0),
    "fourth-root, one unit per group (public weight order within)": ("fourth-root", 0, "public", True, 1.0),
    "fourth-root, one unit per group, clip 0.7": ("fourth-root", 0, "public", True, 0.7),
}


def run(args: argparse.Namespace) -> dict:
    fleet = load_fleet(devices=args.devices, threads=args.threads)
    evaluator = Evaluator(fleet, test_samples=args.test_samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    honest = [wire(d.scores) for d in fleet.devices]
    reference = plan_fleet(fleet, honest)
    clip = median_norm(fleet)
    clip_p = median_norm(fleet, 0.25)
    started = time.perf_counter()

    def record(label: str, mode: str, eps: float | None, z: float, seed: int | None, make) -> None:
        key = f"{label}|{eps}|{seed}"
        if key not in results:
            t0 = time.perf_counter()
            plans = plan_fleet(fleet, aggregated=make())
            row = {"label": label, "mode": mode, "epsilon": eps, "z": z, "seed": seed,
                   "delta_m": evaluator.fleet_delta(plans),
                   "kept_change": {f"{b:g}": v for b, v in kept_change(plans, reference, fleet).items()},
                   "plans": len({p.plan_hash for p in plans.values()}), "seconds": time.perf_counter() - t0}
            results[key] = row
            evaluator.save()
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{label} eps={eps} seed={seed}: delta_m {row['delta_m']['mean']:+.2f} "
                  f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)

    agg_honest = aggregate([(r, d.weights) for r, d in zip(honest, fleet.devices, strict=True)], "weighted-mean")
    families = set(args.rows)
    if "reference" in families:
        record("no noise", "reference", None, 0.0, None, lambda: agg_honest)
        record("no information (equal scores: costs decide)", "reference", None, 0.0, None,
               lambda: uniform_scores(fleet))
        record("server's own scores, no device data", "reference", None, 0.0, None, lambda: server_scores(fleet))
        record("no noise, scores^0.25 (the distributed pipeline without noise)", "reference", None, 0.0, None,
               lambda: distributed_aggregate(fleet, clip_p, 0.0, 0, 0.25))
        record("no noise, scores^0.25, each group's mean only", "reference", None, 0.0, None,
               lambda: group_means(fleet, 0.25))
    s0 = args.seeds[0]
    for eps in args.epsilons:
        z = noise_for_epsilon(eps, TASKS, DELTA)
        for seed in args.seeds:
            if "local" in families:
                record("local DP, clip C = median norm", "local", eps, z, seed,
                       lambda z=z, seed=seed: local_aggregate(fleet, clip, z, seed))
            if "distributed" in families:
                record("distributed DP (central epsilon), clip C", "distributed", eps, z, seed,
                       lambda z=z, seed=seed: distributed_aggregate(fleet, clip, z, seed))
            if "transform" in families:
                record("distributed DP (central epsilon), scores^0.25", "distributed", eps, z, seed,
                       lambda z=z, seed=seed: distributed_aggregate(fleet, clip_p, z, seed, 0.25))
            if "shrink" in families:
                record("distributed DP (central epsilon), scores^0.25, shrinkage", "distributed", eps, z, seed,
                       lambda z=z, seed=seed: distributed_aggregate(fleet, clip_p, z, seed, 0.25, denoise=True))
            if "shrink-local" in families:
                record("local DP, scores^0.25, shrinkage", "local", eps, z, seed,
                       lambda z=z, seed=seed: denoised_local(fleet, clip_p, z, seed, 0.25))
    for eps in args.product_epsilons:
        zp = distributed_noise_for_epsilon(eps, TASKS, DELTA)  # the product's calibration (analytic Gaussian)
        for seed in args.seeds:
            for variant in args.variants if "product" in families else ():
                transform, block, order, shrinkage, clip_u = PRODUCT_VARIANTS[variant]
                record(f"product distributed DP: {variant}", "product", eps, zp, seed,
                       lambda zp=zp, seed=seed, transform=transform, block=block, order=order, shrinkage=shrinkage,
                       clip_u=clip_u: product_aggregate(fleet, zp, seed, transform, shrinkage, block, order, clip_u))
    if "recovered" in families:  # after the default server recovery: no noise and the default product mode
        steps = fleet.settings.recovery.steps
        cache = out / "recovered.json"
        variant = args.variants[0]
        transform, block, order, shrinkage, clip_u = PRODUCT_VARIANTS[variant]
        todo = [("no noise, after recovery", None, None, lambda: agg_honest)]
        for eps in args.recovery_epsilons:
            zp = distributed_noise_for_epsilon(eps, TASKS, DELTA)
            todo += [(f"product distributed DP: {variant}, after recovery", eps, seed,
                      lambda zp=zp, seed=seed: product_aggregate(fleet, zp, seed, transform, shrinkage, block, order,
                                                                 clip_u)) for seed in args.recovery_seeds]
        for label, eps, seed, make in todo:
            key = f"{label}|{eps}|{seed}"
            if key not in results:
                t0 = time.perf_counter()
                row = {"label": label, "mode": "recovered", "epsilon": eps, "z": 0.0, "seed": seed,
                       "recovery_steps": steps, "delta_m": recovered_delta(fleet, evaluator, make(), steps, cache),
                       "kept_change": {}, "plans": 0, "seconds": time.perf_counter() - t0}
                results[key] = row
                results_path.write_text(json.dumps(results, indent=1))
                print(f"{label} eps={eps} seed={seed}: delta_m {row['delta_m']['mean']:+.2f} "
                      f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    if "product-reference" in families:
        for variant in args.variants:
            transform, block, order, shrinkage, clip_u = PRODUCT_VARIANTS[variant]
            record(f"product distributed DP: {variant}, no noise", "reference", None, 0.0, None,
                   lambda transform=transform, block=block, order=order, shrinkage=shrinkage, clip_u=clip_u:
                   product_aggregate(fleet, 1e-9, 0, transform, shrinkage, block, order, clip_u))
    for eps in args.variant_epsilons:
        z = noise_for_epsilon(eps, TASKS, DELTA)
        if "clip" in families:
            for factor in (0.25, 4.0):
                record(f"local DP, clip {factor:g} C", "local", eps, z, s0,
                       lambda z=z, factor=factor: local_aggregate(fleet, factor * clip, z, s0))
        if "transform" in families:
            record("local DP, scores^0.25", "local", eps, z, s0,
                   lambda z=z: local_aggregate(fleet, clip_p, z, s0, 0.25))
    if "large" in families:
        for eps in args.large_epsilons:
            z = noise_for_epsilon(eps, TASKS, DELTA)
            record("local DP, clip C = median norm", "local", eps, z, s0,
                   lambda z=z: local_aggregate(fleet, clip, z, s0))
    evaluator.save()
    meta = {"devices": args.devices, "clip_norm": clip, "clip_norm_power_0.25": clip_p, "delta": DELTA,
            "tasks_worst_device": TASKS, "test_samples": args.test_samples, "cpu": cpu_model(),
            "cores": os.cpu_count(), "seconds_this_run": time.perf_counter() - started,
            "seconds_scoring_cached": fleet.seconds_scoring, "evaluated_this_run": evaluator.evaluated,
            "budgets": fleet.budgets, "check_epsilon": {f"{e:g}": local_epsilon(noise_for_epsilon(e, TASKS, DELTA),
                                                                             TASKS, DELTA) for e in args.epsilons}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return {"results": results, "meta": meta}


def table(results: dict, meta: dict) -> str:
    """Markdown rows; "vs no noise" compares with the no-noise row of the same kind (one-shot or after the
    server's recovery), '-' when that row was not run."""
    reference = {("recovered" if r["mode"] == "recovered" else "one-shot"): r["delta_m"]["mean"]
                 for r in results.values() if r["label"] in ("no noise", "no noise, after recovery")}
    groups: dict[tuple, list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["label"], r["epsilon"]), []).append(r)
    budgets = [k for k in base_keys(results) if k != "mean"]
    lines = [f"clip norm C = {meta['clip_norm']:.1f} (median per-task L2 norm of the honest normalised reports), "
             f"delta {meta['delta']:g}, epsilon of a device with {meta['tasks_worst_device']} tasks; "
             f"{meta['devices']} devices, {meta['test_samples']} test scenes.", "",
             "| mode | epsilon | z | seeds | mean delta_m | vs no noise | " + " | ".join(f"{b}" for b in budgets)
             + " | kept channels changed |",
             "|---|---|---|---|---|---|" + "---|" * len(budgets) + "---|"]
    order = sorted(groups, key=lambda k: (_rank(k[0]), k[0], -(k[1] or 1e9)))
    for label, eps in order:
        rows = groups[(label, eps)]
        means = [r["delta_m"]["mean"] for r in rows]
        m = float(np.mean(means))
        sd = f" ± {np.std(means, ddof=1):.2f}" if len(means) > 1 else ""
        cells = [f"{np.mean([r['delta_m'][b] for r in rows]):+.2f}" for b in budgets]
        changes = [np.mean(list(r["kept_change"].values())) for r in rows if r["kept_change"]]
        change = f"{100 * np.mean(changes):.1f}%" if changes else "-"
        base = reference.get("recovered" if rows[0]["mode"] == "recovered" else "one-shot")
        versus = "-" if base is None else f"{m - base:+.2f}"
        lines.append(f"| {label} | {'-' if eps is None else f'{eps:g}'} | {rows[0]['z']:.3g} | {len(rows)} | "
                     f"{m:+.2f}{sd} | {versus} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines)


def base_keys(results: dict) -> list[str]:
    return list(next(iter(results.values()))["delta_m"])


def _rank(label: str) -> int:
    for i, prefix in enumerate(("no noise", "local DP, clip C", "local DP, clip", "local DP, scores",
                                "distributed DP (central epsilon), clip", "distributed", "server", "no info")):
        if label.startswith(prefix):
            return i
    return 99


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    series = {}
    for r in results.values():
        if r["epsilon"] is not None:
            series.setdefault(r["label"], {}).setdefault(r["epsilon"], []).append(r["delta_m"]["mean"])
    styles = {"local DP, clip C = median norm": ("tab:red", "o-"),
              "local DP, scores^0.25": ("tab:orange", "s--"),
              "distributed DP (central epsilon), clip C": ("tab:blue", "^-"),
              "distributed DP (central epsilon), scores^0.25": ("tab:cyan", "v--"),
              "distributed DP (central epsilon), scores^0.25, shrinkage": ("tab:purple", "D-"),
              "local DP, scores^0.25, shrinkage": ("tab:brown", "P-")}
    for label, (colour, style) in styles.items():
        if label not in series:
            continue
        eps = sorted(series[label])
        mean = [float(np.mean(series[label][e])) for e in eps]
        err = [float(np.std(series[label][e], ddof=1)) if len(series[label][e]) > 1 else 0.0 for e in eps]
        ax.errorbar(eps, mean, yerr=err, fmt=style, color=colour, label=label, capsize=3, ms=5)
    refs = {r["label"]: r["delta_m"]["mean"] for r in results.values() if r["mode"] == "reference"}
    shown = {"no noise": "black", "server's own scores, no device data": "tab:green",
             "no information (equal scores: costs decide)": "grey"}
    for label, colour in shown.items():
        if label in refs:
            ax.axhline(refs[label], color=colour, ls=":", lw=1.2, label=f"{label} ({refs[label]:+.1f})")
    if "no noise" in refs:
        ax.axhspan(refs["no noise"] - 1.0, refs["no noise"], color="black", alpha=0.08,
                   label="target: within 1 point of no noise")
    ax.axvline(2.0, color="black", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon per device at delta 1e-5 (distributed rows: central epsilon)")
    ax.set_ylabel("fleet mean delta_m (%), one-shot")
    ax.set_title("Scores under differential privacy: 100 devices, scenes")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--epsilons", type=floats, default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--product-epsilons", type=floats, default=[0.5, 1.0, 2.0, 4.0, 8.0],
                    help="epsilons of the product's distributed-DP rows (--rows product)")
    ap.add_argument("--recovery-epsilons", type=floats, default=[2.0],
                    help="--rows recovered: epsilons of the default product mode after the server's recovery")
    ap.add_argument("--recovery-seeds", type=lambda t: [int(x) for x in t.split(",") if x], default=[0])
    ap.add_argument("--variants", type=lambda t: t.split(";"), default=["default (fourth-root, clip 0.1)"],
                    help=f"product variants, ';'-separated: {'; '.join(PRODUCT_VARIANTS)}")
    ap.add_argument("--variant-epsilons", type=floats, default=[2.0, 8.0],
                    help="epsilons of the clip-norm and transform variants (one seed)")
    ap.add_argument("--rows", type=lambda t: t.split(","),
                    default=["reference", "local", "distributed", "transform", "shrink", "shrink-local", "clip",
                             "large"],
                    help="row families to run (results accumulate in OUT/results.json)")
    ap.add_argument("--large-epsilons", type=floats, default=[64.0, 1024.0, 1e5],
                    help="local DP at large epsilons (one seed): where does it recover?")
    ap.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",") if x], default=[0, 1, 2])
    ap.add_argument("--test-samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-privacy"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "privacy_delta_m_vs_epsilon.png"))
    args = ap.parse_args(argv)
    done = run(args)
    print(table(done["results"], done["meta"]))
    plot(done["results"], Path(args.plot))
    print(f"\nplot: {args.plot}; {done['meta']['cpu']}, {done['meta']['cores']} cores; "
          f"{done['meta']['seconds_this_run']:.0f} s this run", file=sys.stderr)


if __name__ == "__main__":
    main()
