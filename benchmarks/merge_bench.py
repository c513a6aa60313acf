"""Merge `cutfl bench` runs that split one table by seed into one results.json / results.md / plot.

Every cell of `cutfl bench` depends only on its (seed, budget, method), so runs of one seed each, made
one after another with the same flags, give the rows of one run over all their seeds (the bits of
`--seeds 0,1,2` with one worker). Splitting by seed keeps finished seeds when a long run on a shared
machine has to stop. The merged config keeps the first run's settings, the seeds of all runs, the sum of
their wall times and each run's machine record.

    .venv/bin/python benchmarks/merge_bench.py --model runs/pretrained-scenes --out runs/bench-scenes-sd \
        runs/bench-scenes-sd-seed0 runs/bench-scenes-sd-seed1 runs/bench-scenes-sd-seed2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Settings that must agree between the merged runs (everything that decides a cell's numbers).
SAME = ("tasks", "budgets", "budget_kind", "methods", "structured", "num_batches", "batch_size", "train_samples",
        "test_samples", "recovery", "criterion", "fusion", "normalise", "bn_recalibration", "base_sha256", "dataset",
        "iterative")


def merge(runs: list[dict]) -> dict:
    """One results dict from runs of the same settings over disjoint seeds."""
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]["config"]
    for r in runs[1:]:
        diff = [k for k in SAME if r["config"].get(k) != first.get(k)]
        if diff:
            raise ValueError(f"runs differ in {diff}: they are not parts of one table")
        if r["dense"] != runs[0]["dense"]:
            raise ValueError("runs evaluated different dense models")
    seeds = [s for r in runs for s in r["config"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds appear in more than one run: {seeds}")
    config = {**first, "seeds": seeds, "seconds": sum(r["config"]["seconds"] for r in runs),
              "runs": [{"seeds": r["config"]["seeds"], "seconds": r["config"]["seconds"],
                        "machine": r["config"]["machine"]} for r in runs]}
    config["machine"] = {**first["machine"], "loadavg_end": runs[-1]["config"]["machine"]["loadavg_end"]}
    rows = [row for r in runs for row in r["rows"]]
    return {"config": config, "dense": runs[0]["dense"], "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="output folders of `cutfl bench` (one results.json each)")
    p.add_argument("--model", type=Path, required=True, help="the base model folder the runs pruned")
    p.add_argument("--out", type=Path, required=True, help="folder for the merged results")
    args = p.parse_args()

    from cut.bench import plot_delta, results_markdown
    from cut.checkpoint import load_model

    results = merge([json.loads((d / "results.json").read_text()) for d in args.runs])
    base, _ = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (args.out / "results.md").write_text(results_markdown(results, base.decompose(results["config"]["tasks"])))
    plot_delta(results, args.out / "delta_m_vs_budget.png")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
