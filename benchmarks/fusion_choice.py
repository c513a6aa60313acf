"""Choose CUT's default fusion rule and normalisation by measurement (no fine-tune, several seeds).

    /work/venv/bin/python benchmarks/fusion_choice.py [--model runs/pretrained-scenes] [--tasks seg,depth,normals]
        [--budgets 0.3,0.5,0.7] [--seeds 0,1,2] [--criterion taylor] [--test-samples 400] [--threads 1]

Per seed, the scoring batches (4 x 32 train scenes, shuffled by the seed) are scored once per task; every
(normalisation, rule) pair then fuses the same scores, plans at each params budget, compacts and is
evaluated on the same pre-rendered test scenes. `snip` (summed loss, same planner) is the reference
that ignores tasks. Prints a markdown table of delta_m mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cut import fusion  # noqa: E402
from cut.budget import BudgetOptions, make_plan, uniform_keep_fraction  # noqa: E402
from cut.checkpoint import load_model  # noqa: E402
from cut.compact import compact_model, recalibrate_batchnorm  # noqa: E402
from cut.data import get_dataset  # noqa: E402
from cut.groups import analyse  # noqa: E402
from cut.importance import score_summed, score_tasks, take_batches  # noqa: E402
from cut.metrics import mean_std  # noqa: E402
from cut.train import evaluate, make_loader, multitask_delta  # noqa: E402  # noqa: E402
from cut.train import primary_metrics as primary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/pretrained-scenes")
    ap.add_argument("--tasks", default="seg,depth,normals")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--criterion", default="taylor")
    ap.add_argument("--test-samples", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recalibrate", action="store_true", help="re-estimate BN statistics on the scoring batches")
    ap.add_argument("--norms", default="global,mean,sum")
    ap.add_argument("--rules", default="mean,max,union")
    ap.add_argument("--ranking", default="per-cost", help="score, per-cost or both")
    ap.add_argument("--baselines", action="store_true", help="add snip and disparse-style rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, card = load_model(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [(f"{n}-norm / {r}", n, r) for n in args.norms.split(",") for r in args.rules.split(",")]
    rankings = {"score": (False,), "per-cost": (True,), "both": (False, True)}[args.ranking]
    model = base.decompose(tasks).eval()
    analysis = analyse(model)
    size = model.config.input_size[0]
    train = get_dataset("scenes", "train", num_samples=4000, size=size, seed=0)
    test = list(make_loader(get_dataset("scenes", "test", num_samples=args.test_samples, size=size, seed=0), 50))
    dense = evaluate(model, test, tasks)
    results: dict[tuple[str, float], list[float]] = {}
    started = time.perf_counter()
    for seed in seeds:
        batches = take_batches(make_loader(train, 32, shuffle=True, seed=seed), 4)
        per_task = score_tasks(model, batches, tasks, args.criterion, 4, seed)
        if args.baselines:
            summed = {"sum": score_summed(model, batches, tasks, "saliency", 4, seed)}
            saliency = score_tasks(model, batches, tasks, "saliency", 4, seed)
        for budget in budgets:
            keep_fraction = uniform_keep_fraction(analysis, "params", budget)
            fused_all = {label: fusion.fuse(per_task, rule, norm, keep_fraction=keep_fraction)
                         for label, norm, rule in configs}
            if args.baselines:
                fused_all["snip (summed saliency, per-layer mean-norm)"] = fusion.fuse(summed, "mean", "mean")
                fused_all["snip (summed saliency, raw)"] = fusion.fuse(summed, "mean", "global")
                for norm in ("global", "mean"):
                    fused_all[f"disparse (task saliency, {norm}-norm, union)"] = fusion.fuse(
                        saliency, "union", norm, keep_fraction=keep_fraction)
            for (label, fused), aware in itertools.product(fused_all.items(), rankings):
                label = f"{label}{' / score per cost' if aware else ''}"
                options = BudgetOptions(cost_aware=aware)
                plan = make_plan(fused, analysis, "params", budget, options, tasks=tuple(tasks))
                compact = compact_model(model, plan)
                if args.recalibrate:
                    recalibrate_batchnorm(compact, batches)
                metrics = evaluate(compact, test, tasks)
                d = multitask_delta(model, metrics, dense)
                results.setdefault((label, budget), []).append(d)
                print(f"seed {seed} budget {budget} {label}: delta_m {d:+.2f} "
                      f"{ {t: round(v, 3) for t, v in primary(model, metrics).items()} }", file=sys.stderr, flush=True)
    labels = list(dict.fromkeys(label for label, _ in results))
    print(f"# fusion choice: {args.model} (sha256 {card['weights_sha256'][:12]}), tasks {','.join(tasks)}, "
          f"criterion {args.criterion}, no fine-tune"
          f"{', BN statistics re-estimated on the scoring batches' if args.recalibrate else ''}\n")
    print(f"seeds {seeds}; 4 scoring batches of 32; {args.test_samples} test scenes; dense primary metrics "
          f"{ {t: round(v, 3) for t, v in primary(model, dense).items()} }; {os.cpu_count()} cores; "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| normalisation / rule | " + " | ".join(f"{b:g}" for b in budgets) + " | mean |")
    print("|---|" + "---|" * (len(budgets) + 1))
    for label in labels:
        cells = [mean_std(results[(label, b)]) for b in budgets]
        overall = sum(m for m, _ in cells) / len(cells)
        print(f"| {label} | " + " | ".join(f"{m:+.2f} ± {s:.2f}" for m, s in cells) + f" | {overall:+.2f} |")


if __name__ == "__main__":
    main()
