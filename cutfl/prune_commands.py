"""`cutfl prune` and `cutfl bench`: the CUT engine on one machine (no Flower)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cutfl.args import budget_fraction, int_at_least, parse_budget


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def prune_budget(text: str) -> tuple[str, float]:
    """--budget of `cutfl prune`: params=F, macs=F, memory=F (of the dense decomposed model's batch-1
    inference memory, cut.memory), memory=3MB (a size), latency=F (a fraction of the dense decomposed
    model's time measured here) or latency=Xms (milliseconds on this machine) -> (kind, value); kind
    'latency_ms' for milliseconds, 'memory_bytes' for a size."""
    kind, _, value = text.partition("=")
    if kind == "memory":
        from cut.memory import parse_memory_budget

        try:
            fraction, nbytes = parse_memory_budget(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return ("memory_bytes", nbytes) if nbytes else ("memory", fraction)
    if kind == "latency" and value.strip().lower().endswith("ms"):
        number = value.strip()[:-2]
        try:
            ms = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"latency budget {value!r} is not a number of milliseconds") from None
        if not (ms > 0 and ms < 1e7):
            raise argparse.ArgumentTypeError(f"latency budget {value!r} must be a positive number of milliseconds")
        return "latency_ms", ms
    if kind == "latency":
        return "latency", budget_fraction(value)
    try:
        return parse_budget(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (nor 'memory' or 'latency'; e.g. params=0.5, macs=0.5, "
                                         "memory=0.5, memory=3MB, latency=0.5, latency=2.5ms)") from None


def _latency_budget(args: argparse.Namespace, base, tasks: list[str], card: dict, kind: str, value: float):
    """(fraction, options, latency block of the report) for a latency budget, from this machine's table."""
    from cut.budget import BudgetOptions
    from cut.latency import table_for

    if args.iterative > 1:
        raise ValueError("a latency budget plans against the dense model's measured table: use --iterative 1")
    decomposed = base.decompose(list(tasks)).eval()
    table = table_for(decomposed, card["weights_sha256"], threads=max(1, args.threads), progress=not args.quiet)
    asked_ms = value if kind == "latency_ms" else value * table.dense_ms
    fraction = min(1.0, asked_ms / table.dense_ms)
    block = {"asked_ms": asked_ms, "asked_fraction": value if kind == "latency" else None,
             "table": {"runtime": table.runtime, "threads": table.threads, "round_to": table.round_to,
                       "dense_ms": table.dense_ms, "seconds_to_measure": table.seconds,
                       "calibration": [list(p) for p in table.calibration]}}
    if asked_ms >= table.dense_ms:
        block["note"] = f"{asked_ms:.3f} ms is not below the dense model's {table.dense_ms:.3f} ms: nothing is pruned"
    return fraction, BudgetOptions(latency=table), block


def _checked_table(args: argparse.Namespace, base, tasks: list[str], card: dict, fraction: float, options,
                   scoring_batches, block: dict):
    """The table to plan with after `cut.latency.check_plan` timed up to --latency-checks plans here."""
    from dataclasses import replace

    from cut.latency import check_plan
    from cut.methods import PlanRequest, plan_with

    decomposed = base.decompose(list(tasks)).eval()

    def plan_for(table):
        request = PlanRequest(model=decomposed, batches=list(scoring_batches), tasks=tuple(tasks),
                              budget_kind="latency", budget_value=fraction, options=replace(options, latency=table),
                              seed=args.seed, base_model_sha256=card["weights_sha256"])
        return plan_with(args.method, request, criterion=args.criterion, fusion_rule=args.fusion).plan

    table, _, checks = check_plan(decomposed, options.latency, plan_for, fraction, threads=max(1, args.threads),
                                  max_checks=args.latency_checks)
    block["checks"] = [{"predicted_fraction": c.predicted_fraction, "measured_fraction": c.measured_fraction,
                        "dense_ms": c.dense_ms} for c in checks]
    block["table"]["calibration_checked"] = [list(p) for p in table.calibration]
    return replace(options, latency=table)


def _memory_budget(base, tasks: list[str], kind: str, value: float) -> tuple[float, dict]:
    """(fraction, memory block of the report) for a memory budget: a size becomes a fraction of the dense
    decomposed model's memory (cut.memory.memory_fraction: 1 at or above it, an error below the smallest plan)."""
    from cut.groups import analyse
    from cut.memory import format_bytes, memory_cost, memory_fraction

    analysis = analyse(base.decompose(list(tasks)).eval())
    dense = memory_cost(analysis).dense("memory")
    if kind == "memory":
        return value, {"asked_fraction": value, "asked_bytes": value * dense, "dense_bytes": dense}
    fraction = memory_fraction(analysis, value)
    block = {"asked_bytes": value, "asked_fraction": None, "dense_bytes": dense}
    if value >= dense:
        block["note"] = (f"{format_bytes(value)} is not below the dense model's {format_bytes(dense)}: "
                         "nothing is pruned")
    return fraction, block


def _memory_achieved(compact, plan, block: dict) -> dict:
    """Measured on the compact model (cut.memory.model_memory), next to the planner's prediction."""
    from cut.memory import model_memory

    measured = model_memory(compact.eval())
    block.update(predicted_bytes=plan.achieved.get("memory_bytes"), achieved_bytes=measured["memory_bytes"],
                 achieved_fraction=measured["memory_bytes"] / block["dense_bytes"],
                 weight_bytes=measured["weight_bytes"], activation_bytes=measured["activation_bytes"],
                 peak_layer=measured["peak_layer"],
                 counts="float32 weights + the peak over Conv2d/Linear layers of input + output activations, "
                        "batch 1 (cut.memory)")
    return block


def _measure_achieved(decomposed, compact, out: Path, card: dict, block: dict, threads: int) -> dict:
    """Export the compact model next to its weights and time it against the dense one, interleaved."""
    import tempfile

    from cut.export import export_onnx
    from cut.latency import REPEATS, timed_fraction

    onnx_path = out / "model.onnx"
    export_onnx(compact, onnx_path, card=card)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        export_onnx(decomposed, dense_path)
        dense_ms, achieved_ms = timed_fraction(dense_path, onnx_path, threads)
    block.update(dense_ms_now=dense_ms, achieved_ms=achieved_ms, achieved_fraction=achieved_ms / dense_ms,
                 timing=f"medians of 120 batch-1 onnxruntime runs, dense and compact interleaved (12 rounds of 10); "
                        f"of {REPEATS} such timings, the one of median compact / dense",
                 onnx=str(onnx_path))
    if block["asked_fraction"] is not None:
        block["error"] = block["achieved_fraction"] / block["asked_fraction"] - 1
    else:
        block["error"] = achieved_ms / block["asked_ms"] - 1
    return block


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
    options, latency, memory = None, None, None
    if kind in ("latency", "latency_ms"):
        value, options, latency = _latency_budget(args, base, tasks, card, kind, value)
        kind = "latency"
        if args.latency_checks and value < 1.0:
            options = _checked_table(args, base, tasks, card, value, options, data.scoring, latency)
    if kind in ("memory", "memory_bytes"):
        value, memory = _memory_budget(base, tasks, kind, value)
        kind = "memory"
    compact, plan, report = prune(
        base, tasks, kind, value, method=args.method, criterion=args.criterion, fusion=args.fusion,
        test_loader=test_batches, seed=args.seed, base_sha256=card["weights_sha256"], recovery=recovery,
        scoring_batches=data.scoring, recovery_batches=data.recovery, progress=not args.quiet,
        iterative=args.iterative, options=options,
    )
    out: Path = args.out
    compact_card = {
        "dataset": dataset, "dataset_kwargs": card.get("dataset_kwargs", {}), "test_kwargs": card.get("test_kwargs", {}),
        "plan": plan.to_dict(), "base_model_sha256": card["weights_sha256"], "base_model_dir": str(args.model),
        "metrics": report.get("metrics", {}).get("compact"),
    }
    compact_card["weights_sha256"] = save_model(out, compact, compact_card)
    if latency is not None:
        latency["predicted_ms"] = plan.achieved.get("latency_ms_predicted")
        report["latency"] = _measure_achieved(base.decompose(list(tasks)).eval(), compact.eval(), out, compact_card,
                                              latency, max(1, args.threads))
    if memory is not None:
        report["memory_budget"] = _memory_achieved(compact, plan, memory)
    (out / "plan.json").write_text(plan.to_json())
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    summary = {k: report.get(k) for k in ("tasks", "method", "budget", "params", "macs", "bytes", "memory",
                                          "params_ratio", "macs_ratio", "memory_ratio", "params_ratio_full",
                                          "macs_ratio_full", "delta_m", "delta_m_before_recovery")}
    summary["recovery"] = report["recovery"]["budget"]
    summary["seconds_prune"] = report["seconds"].get("prune_total")
    if latency is not None:
        summary["latency"] = {k: latency.get(k) for k in ("asked_ms", "asked_fraction", "predicted_ms", "achieved_ms",
                                                          "dense_ms_now", "achieved_fraction", "error", "checks", "note")
                              if latency.get(k) is not None}
    if memory is not None:
        summary["memory_budget"] = {k: memory.get(k) for k in ("asked_bytes", "asked_fraction", "dense_bytes",
                                                               "predicted_bytes", "achieved_bytes",
                                                               "achieved_fraction", "note")
                                    if memory.get(k) is not None}
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
                       help="torch threads, and onnxruntime threads of a latency budget (default 1: on a shared "
                            "2-core machine more threads wait on each other)")
        p.add_argument("--quiet", action="store_true", help="no progress display")

    p = sub.add_parser("prune", help="prune a model for a task subset and budget (one compact model)")
    p.add_argument("--model", type=Path, required=True, help="pre-trained model directory")
    p.add_argument("--tasks", required=True, help="comma-separated tasks to keep, e.g. seg,depth")
    p.add_argument("--budget", type=prune_budget, default=("params", 0.5),
                   help="what may remain of the decomposed model: params=F, macs=F, memory=F or latency=F with F "
                        "in (0, 1] (memory: float32 weights + peak activations of batch-1 inference; latency: of "
                        "the dense model's onnxruntime time measured here, on --threads threads), memory=SIZE "
                        "(e.g. 3MB, 512KiB) or latency=Xms (milliseconds here); a latency budget writes "
                        "model.onnx and reports asked vs achieved latency")
    p.add_argument("--method", default="cut", help="cut, a baseline (random, l1, snip, disparse, tp), an ablation "
                                                   "(cut-...) or a Torch-Pruning grid point (tp-...)")
    p.add_argument("--dataset", help="dataset for scoring and evaluation (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and random choices")
    p.add_argument("--out", type=Path, required=True, help="directory for the compact model and report.json")
    p.add_argument("--latency-checks", type=int_at_least(0), default=3, metavar="N",
                   help="a latency budget: time up to N plans whole beside the dense model before recovery, each "
                        "measurement correcting the table's calibration, and keep the one closest to the budget "
                        "(cut.latency.check_plan; 0: plan from the table alone)")
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
