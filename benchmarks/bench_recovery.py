"""Measure `cut.recovery` on CUT-pruned scenes models: delta_m and seconds per recovery recipe and budget.

    .venv/bin/python benchmarks/bench_recovery.py [--model runs/pretrained-scenes] [--configs NAME,...]
        [--budgets 0.3,0.5,0.7] [--tasks seg,depth/seg,depth,normals] [--pool 2048] [--test-samples 300]
        [--threads 2] [--out benchmarks/results/recovery.json]

For every task set and params budget the base model is pruned with `cut.pipeline.prune` (method cut,
BatchNorm re-estimated on the 4 scoring batches, no fine-tune). Each recovery recipe (CONFIGS) then
recovers all these compact models together with `recover_many`, the full base model as the teacher, on one
fixed list of batches drawn from the card's training data (the server's pre-training data), and each model
is evaluated on the card's test split against its dense decomposed model. Seconds per model are its own
updates plus an equal share of the teacher passes. Results merge into the JSON by recipe name, so recipes
can be run in pieces; a markdown table of everything in the JSON is printed at the end. Recipes are named
by what they change (see `recipe`), e.g. kd_300_lr1e-3_task0.5_at1.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import cpu_model  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)

from cut.checkpoint import load_model  # noqa: E402
from cut.data import get_dataset  # noqa: E402
from cut.pipeline import prune  # noqa: E402
from cut.recovery import RecoveryConfig, recover_many, recovery_batches  # noqa: E402
from cut.train import evaluate, make_loader, multitask_delta  # noqa: E402

# A recipe is named by its changes from RecoveryConfig's field values written here: "kd_STEPS" then any of
# lrX, atW (feature_weight), taskW (1 - distill_weight: the task loss' share), bN (batch size), warmF,
# frozenbn, headres, wdX. "none" is no recovery. E.g. kd_300_lr1e-3_task0.5_at1.
RECIPE_BASE = dict(lr=3e-3, distill_weight=1.0, feature_weight=0.0, batch_size=32, warmup_fraction=0.1)


def recipe(name: str) -> RecoveryConfig:
    """The RecoveryConfig a recipe name stands for."""
    if name == "none":
        return RecoveryConfig(steps=0)
    head, steps, *mods = name.split("_")
    if head != "kd":
        raise ValueError(f"recipe {name!r} must start with kd_STEPS")
    fields = dict(RECIPE_BASE, steps=int(steps))
    for mod in mods:
        for prefix, key, conv in (("lr", "lr", float), ("at", "feature_weight", float), ("task", "distill_weight",
                                  lambda v: 1.0 - float(v)), ("b", "batch_size", int), ("warm", "warmup_fraction",
                                  float), ("wd", "weight_decay", float)):
            if mod.startswith(prefix) and mod[len(prefix):][:1].isdigit():
                fields[key] = conv(mod[len(prefix):])
                break
        else:
            if mod not in ("frozenbn", "headres"):
                raise ValueError(f"recipe {name!r}: unknown part {mod!r}")
            fields["freeze_bn" if mod == "frozenbn" else "head_resolution"] = True
    return RecoveryConfig(**fields)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/pretrained-scenes")
    p.add_argument("--configs", default="none,kd_100,kd_300", help="comma-separated recipe names (see recipe())")
    p.add_argument("--budgets", default="0.3,0.5,0.7")
    p.add_argument("--tasks", default="seg,depth/seg,depth,normals", help="task sets separated by /")
    p.add_argument("--pool", type=int, default=2048, help="distinct training samples the recovery batches hold")
    p.add_argument("--test-samples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0,
                   help="scoring batches, recovery batches and their order; runs of seed > 0 are stored as NAME@seedN")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="/tmp/bench_recovery_cache", help="rendered batches are kept here")
    p.add_argument("--out", default="benchmarks/results/recovery.json")
    return p.parse_args(argv)


def cached(path: Path, make):
    """Rendered batches (tensors in dicts/lists/tuples) kept between runs; loaded without unpickling code."""
    if path.exists():
        return torch.load(path, weights_only=True)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base, card = load_model(args.model)
    train_kwargs, test_kwargs = dict(card["dataset_kwargs"]), dict(card["test_kwargs"])
    test_kwargs["num_samples"] = min(args.test_samples, test_kwargs.get("num_samples", args.test_samples))
    key = f"{card['weights_sha256'][:12]}-s{args.seed}-p{args.pool}-t{test_kwargs['num_samples']}"
    cache = Path(args.cache)
    train_set = get_dataset(card["dataset"], "train", **train_kwargs)

    def test_batches():
        return list(make_loader(get_dataset(card["dataset"], "test", **test_kwargs), 64))

    t = time.perf_counter()
    test = cached(cache / f"test-{key}.pt", test_batches)
    scoring = cached(cache / f"scoring-{key}.pt",
                     lambda: [b for b, _ in zip(make_loader(train_set, 32, shuffle=True, seed=args.seed), range(4),
                                                strict=False)])
    pools: dict[int, list] = {}
    print(f"data ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    task_sets = [ts.split(",") for ts in args.tasks.split("/")]
    budgets = [float(b) for b in args.budgets.split(",")]
    dense, compacts = {}, {}
    t = time.perf_counter()
    for tasks in task_sets:
        name = ",".join(tasks)
        dense[name] = evaluate(base.decompose(tasks).eval(), test, tasks)
        for b in budgets:
            compact, _, report = prune(base, tasks, "params", b, "cut", train_loader=scoring, num_batches=4,
                                       seed=args.seed, recalibrate_bn=True, progress=False)
            compacts[f"{name}@{b:g}"] = (compact, tasks, report["params_ratio"])
    print(f"pruned {len(compacts)} models in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                          "loadavg_start": os.getloadavg()[0]}
    results["setup"] = {"model": args.model, "weights_sha256": card["weights_sha256"], "pool": args.pool,
                        "test_samples": test_kwargs["num_samples"], "budgets": budgets,
                        "task_sets": [",".join(ts) for ts in task_sets], "dense": dense}
    for cname in args.configs.split(","):
        config = recipe(cname)
        if config.batch_size not in pools:
            pools[config.batch_size] = cached(
                cache / f"pool-{key}-b{config.batch_size}.pt",
                lambda c=config: recovery_batches(train_set, c, seed=args.seed + 1, num_samples=args.pool))
        students = {k: copy.deepcopy(m) for k, (m, _, _) in compacts.items()}
        t = time.perf_counter()
        stats = recover_many(students, base, pools[config.batch_size], config, seed=args.seed)
        wall = time.perf_counter() - t
        rows = {}
        for k, model in students.items():
            tasks, ratio = compacts[k][1], compacts[k][2]
            metrics = evaluate(model, test, tasks)
            s = {x: v for x, v in stats[k].items() if x != "lr"}
            rows[k] = {"delta_m": multitask_delta(model, metrics, dense[",".join(tasks)]), "metrics": metrics,
                       "params_ratio": ratio, **s}
        run_name = cname if args.seed == 0 else f"{cname}@seed{args.seed}"
        results["runs"][run_name] = {"config": asdict(config), "budget": config.budget(), "wall_seconds": wall,
                                     "seed": args.seed, "students": len(students), "loadavg": os.getloadavg()[0],
                                     "rows": rows}
        print(f"{cname}: " + " ".join(f"{k} {r['delta_m']:+.2f}" for k, r in rows.items())
              + f" ({wall:.0f} s for {len(students)} models)", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    runs = results["runs"]
    setup = results["setup"]
    cols = [f"{ts}@{b:g}" for ts in setup["task_sets"] for b in setup["budgets"]]
    lines = [
        f"Recovery of CUT-pruned models (params budgets), {results['machine']['cpu']}, "
        f"{results['machine']['threads']} torch thread(s); pool {results['setup']['pool']} training samples, "
        f"{results['setup']['test_samples']} test samples. delta_m (%) vs the dense decomposed model; "
        "s/model = seconds of recovery per model (its updates + a share of the teacher passes), wall and "
        "process CPU time (the CPU time estimates an idle core when the machine is shared).",
        "",
        "| recipe | budget | " + " | ".join(cols) + " | s/model | CPU s/model |",
        "|---|---|" + "---|" * (len(cols) + 2),
    ]
    order = sorted(runs, key=lambda n: (runs[n]["config"]["steps"], runs[n].get("seed", 0), n))
    for name in order:
        rows = runs[name]["rows"]
        secs = sum(r["seconds"] for r in rows.values()) / max(1, len(rows))
        cpu = sum(r.get("cpu_seconds") or 0.0 for r in rows.values()) / max(1, len(rows))
        lines.append(f"| {name} | {runs[name]['budget']} | "
                     + " | ".join(f"{rows[c]['delta_m']:+.2f}" if c in rows else "-" for c in cols)
                     + f" | {secs:.0f} | {cpu:.0f} |")
    seeded: dict[str, list[dict]] = {}
    for name in order:
        seeded.setdefault(name.split("@")[0], []).append(runs[name]["rows"])
    seeded = {k: v for k, v in seeded.items() if len(v) > 1}
    if seeded:
        lines += ["", "Recipes run with several seeds: mean +- sample std of delta_m.", "",
                  "| recipe | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for name, all_rows in seeded.items():
            cells = []
            for c in cols:
                vals = [rows[c]["delta_m"] for rows in all_rows if c in rows]
                mean = sum(vals) / len(vals)
                std = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
                cells.append(f"{mean:+.2f} ± {std:.2f}")
            lines.append(f"| {name} | {len(all_rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
