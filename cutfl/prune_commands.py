"""`cutfl prune` and `cutfl bench`: the CUT engine on one machine (no Flower)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cutfl.args import budget_fraction, parse_budget


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _fractions(text: str) -> list[float]:
    return [budget_fraction(item) for item in _csv(text)]


def _steps(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"--iterative needs a whole number of pruning steps >= 1, got {text!r}")
    return k


def _seeds(text: str) -> list[int]:
    """'3' -> seeds 0, 1, 2; '0,5,9' -> those seeds."""
    try:
        if "," in text:
            return [int(s) for s in _csv(text)]
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed count or a list of seeds") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return list(range(n))


def _load_base(model_dir: Path, dataset: str | None):
    from cut.checkpoint import load_model

    if not model_dir.exists() and dataset and model_dir == Path("runs") / f"pretrained-{dataset}":
        from cut.train import pretrain_model

        print(f"no model at {model_dir}: pre-training one (cutfl pretrain --dataset {dataset})", file=sys.stderr)
        pretrain_model(dataset, model_dir)
    return load_model(model_dir)


def _datasets(card: dict, dataset: str, train_samples: int, test_samples: int, data_dir: str | None):
    from cut.data import get_dataset

    same = dataset == card.get("dataset")
    train_kwargs = dict(card.get("dataset_kwargs", {})) if same else {}
    test_kwargs = dict(card.get("test_kwargs", {})) if same else {}
    if data_dir:
        train_kwargs["data_dir"] = test_kwargs["data_dir"] = data_dir
    train_kwargs["num_samples"] = train_samples
    test_kwargs["num_samples"] = test_samples
    return get_dataset(dataset, "train", **train_kwargs), get_dataset(dataset, "test", **test_kwargs)


def _recovery(args: argparse.Namespace):
    from cut.pipeline import RecoveryConfig

    return RecoveryConfig(steps=args.recovery_steps, batch_size=args.recovery_batch_size or args.batch_size,
                          lr=args.recovery_lr, distill_weight=args.recovery_distill)


def _threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, args.threads))


def cmd_prune(args: argparse.Namespace) -> int:
    from cut.checkpoint import save_model
    from cut.pipeline import Samples, prune, seed_data
    from cut.tasks import parse_task_list

    _threads(args)
    base, card = _load_base(args.model, None)
    tasks = parse_task_list(args.tasks, list(base.config.tasks))
    dataset = args.dataset or card.get("dataset")
    if not dataset:
        raise ValueError(f"{args.model}: the card names no dataset; pass --dataset")
    train_set, test_set = _datasets(card, dataset, args.train_samples, args.test_samples, args.data_dir)
    recovery = _recovery(args)
    # The same data as `cutfl bench` draws for this seed: a run here reproduces the bench's cell.
    data = seed_data(Samples.from_dataset(train_set), args.seed, args.batch_size, args.num_batches, recovery)
    test_batches = Samples.from_dataset(test_set).batches(64)
    kind, value = args.budget
    compact, plan, report = prune(
        base, tasks, kind, value, method=args.method, criterion=args.criterion, fusion=args.fusion,
        test_loader=test_batches, seed=args.seed, base_sha256=card["weights_sha256"], recovery=recovery,
        scoring_batches=data.scoring, recovery_batches=data.recovery, progress=not args.quiet,
        iterative=args.iterative,
    )
    out: Path = args.out
    save_model(out, compact, {
        "dataset": dataset, "dataset_kwargs": card.get("dataset_kwargs", {}), "test_kwargs": card.get("test_kwargs", {}),
        "plan": plan.to_dict(), "base_model_sha256": card["weights_sha256"], "base_model_dir": str(args.model),
        "metrics": report.get("metrics", {}).get("compact"),
    })
    (out / "plan.json").write_text(plan.to_json())
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    summary = {k: report.get(k) for k in ("tasks", "method", "budget", "params", "macs", "bytes", "params_ratio",
                                          "macs_ratio", "params_ratio_full", "macs_ratio_full", "delta_m",
                                          "delta_m_before_recovery")}
    summary["recovery"] = report["recovery"]["budget"]
    summary["seconds_prune"] = report["seconds"].get("prune_total")
    summary["out"] = str(out)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cut.bench import expand_methods, run_bench
    from cut.tasks import parse_task_list

    _threads(args)
    model_dir = args.model or Path("runs") / f"pretrained-{args.dataset}"
    base, card = _load_base(model_dir, args.dataset)
    tasks = parse_task_list(args.tasks, list(base.config.tasks)) if args.tasks else base.task_names[:2]
    methods = expand_methods(args.methods)  # ValueError naming the known methods for an unknown one
    same = args.dataset == card.get("dataset")
    kwargs = {k: v for k, v in (card.get("dataset_kwargs", {}) if same else {}).items() if k != "num_samples"}
    if args.data_dir:
        kwargs["data_dir"] = args.data_dir
    run_bench(
        base, args.dataset, tasks, budgets=args.budgets, methods=methods, seeds=args.seeds,
        finetune_steps=args.recovery_steps, out_dir=args.out, structured=not args.unstructured,
        sparsity=args.budgets if args.unstructured else None, budget_kind=args.budget_kind,
        dataset_kwargs=kwargs, train_samples=args.train_samples, test_samples=args.test_samples,
        batch_size=args.batch_size, num_batches=args.num_batches, criterion=args.criterion, fusion=args.fusion,
        recovery=_recovery(args), workers=args.workers, progress=not args.quiet, base_sha256=card["weights_sha256"],
        iterative=args.iterative,
    )
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {args.out}/results.json, {args.out}/results.md, {args.out}/delta_m_vs_budget.png",
          file=sys.stderr)
    return 0


def add_commands(sub, parser_class=argparse.ArgumentParser) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--criterion", help="importance criterion (taylor, fisher, act-grad, magnitude, random; "
                                           "default: the method's)")
        p.add_argument("--fusion", help="fusion rule for shared groups (max, mean, weighted, union; default: the method's)")
        p.add_argument("--num-batches", type=int, default=4, help="batches of data used for scoring")
        p.add_argument("--batch-size", type=int, default=32, help="batch size for scoring (and recovery by default)")
        p.add_argument("--recovery-steps", "--finetune-steps", dest="recovery_steps", type=int, default=0,
                       help="recovery steps after pruning, the same for every method: task losses + distillation "
                            "from the dense model (0: none; --finetune-steps is an alias)")
        p.add_argument("--recovery-batch-size", type=int, help="recovery batch size (default: --batch-size)")
        # lr 1e-3 with half task loss, half distillation (also cut.recovery's defaults): the best of {3e-3,
        # 1e-3} x {distillation only, half and half} at 100 steps x 32 for cut, disparse and tp on tuning
        # seed 100 (params 0.5). Attention transfer and the rest follow cut.recovery.RecoveryConfig.
        p.add_argument("--recovery-lr", type=float, default=1e-3, help="recovery peak learning rate (AdamW, 10%% "
                                                                        "warm-up + cosine)")
        p.add_argument("--recovery-distill", type=float, default=0.5,
                       help="weight of output distillation from the dense model; 1 - it weighs the task losses")
        p.add_argument("--iterative", type=_steps, default=1, metavar="K",
                       help="prune in K steps, re-scoring and recovering between them (the recovery steps are "
                            "split over the K steps, same total; default 1: one shot)")
        p.add_argument("--train-samples", type=int, default=512, help="training samples available for scoring/fine-tune")
        p.add_argument("--test-samples", type=int, default=256, help="test samples to evaluate on")
        p.add_argument("--data-dir", help="directory with the dataset's files (real datasets only)")
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: on a shared 2-core machine more threads wait on each other)")
        p.add_argument("--quiet", action="store_true", help="no progress display")

    p = sub.add_parser("prune", help="prune a model for a task subset and budget (one compact model)")
    p.add_argument("--model", type=Path, required=True, help="pre-trained model directory")
    p.add_argument("--tasks", required=True, help="comma-separated tasks to keep, e.g. seg,depth")
    p.add_argument("--budget", type=parse_budget, default=("params", 0.5),
                   help="what may remain of the decomposed model: params=F or macs=F with F in (0, 1]")
    p.add_argument("--method", default="cut", help="cut, a baseline (random, l1, snip, disparse, tp), an ablation "
                                                   "(cut-...) or a Torch-Pruning grid point (tp-...)")
    p.add_argument("--dataset", help="dataset for scoring and evaluation (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and random choices")
    p.add_argument("--out", type=Path, required=True, help="directory for the compact model and report.json")
    common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("bench", help="compare pruning methods over budgets and seeds (one table + plot)")
    p.add_argument("--dataset", default="scenes", help="dataset (its pre-trained model: runs/pretrained-DATASET)")
    p.add_argument("--model", type=Path, help="pre-trained model directory (default runs/pretrained-DATASET)")
    p.add_argument("--tasks", help="comma-separated selected tasks (default: the first two)")
    p.add_argument("--budgets", type=_fractions, default=[0.3, 0.5, 0.7],
                   help="fractions that may remain, e.g. 0.3,0.5,0.7 (sparsities with --unstructured: kept fraction "
                        "is 1 - value)")
    p.add_argument("--budget-kind", choices=["params", "macs"], default="params", help="what the budget counts")
    p.add_argument("--methods", type=_csv, default=["random", "l1", "snip", "disparse", "tp", "cut"],
                   help="comma-separated methods (tp-grid: every Torch-Pruning grid point)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="number of seeds (N -> 0..N-1) or a list")
    p.add_argument("--unstructured", action="store_true", help="per-weight masks; --budgets are then sparsities")
    p.add_argument("--workers", type=int, default=1,
                   help="cells run in this many processes of --threads threads each (results are the same bits)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    common(p)
    p.set_defaults(func=cmd_bench)
