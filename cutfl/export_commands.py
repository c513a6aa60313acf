"""`cutfl export` and `cutfl infer`: from a model directory to an ONNX file (or, with `--format executorch`,
an ExecuTorch `.pte` for phones) a device can run, and running it.

Registered by cutfl/cli.py through `add_commands`. Heavy modules are imported inside the commands:
`infer` must work on a device that has onnxruntime, numpy and Pillow but no torch, so nothing on its path
(this module included) may import torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cutfl.args import CliError, int_at_least, positive_float

FORMATS = ("onnx", "executorch")
MIN_LATENCY_RUNS = 20  # EVALUATION.md: median of >= 20 runs after warm-up


def _latency_runs(text: str) -> int:
    value = int_at_least(0)(text)
    if 0 < value < MIN_LATENCY_RUNS:
        raise argparse.ArgumentTypeError(f"{text!r}: use 0 (skip) or at least {MIN_LATENCY_RUNS} runs")
    return value


def _require(modules: tuple[str, ...], command: str, install: str) -> None:
    """One clear line instead of a traceback when a device-only install lacks what a command needs."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"`cutfl {command}` needs {', '.join(missing)}, not installed here: {install}")


def cmd_export(args: argparse.Namespace) -> int:
    """Export, then prove the file is usable: parity with torch, its size, and a latency figure."""
    if args.format not in FORMATS:
        raise ValueError(f"unknown export format {args.format!r}; known: {', '.join(FORMATS)}")
    _require(("torch", "onnx", "onnxruntime"), "export", "install the full cut-fl package (a device-only "
             "install can run `cutfl infer` only)")
    if args.format == "executorch":
        return _export_executorch(args)
    from cut.checkpoint import load_model
    from cut.export import check_parity, export_onnx, measure_latency
    from cut.infer import DEFAULT_ONNX_NAME, sidecar_path

    model, card = load_model(args.model)
    out = args.out or Path(args.model) / DEFAULT_ONNX_NAME
    sidecar = export_onnx(model, out, opset=args.opset, dynamic_batch=not args.fixed_batch, card=card,
                          dataset=args.dataset)
    diff = check_parity(model, out, n=args.parity_samples, tol=args.tolerance)
    latency = (measure_latency(out, runs=args.latency_runs, warmup=args.warmup, threads=args.threads)
               if args.latency_runs else None)
    return _print_export({"onnx": str(out), "sidecar": str(sidecar_path(out)), "exporter": sidecar["exporter"],
                          "opset": args.opset, "bytes": sidecar["onnx_bytes"]}, sidecar, diff, args.tolerance, latency)


def _print_export(head: dict, sidecar: dict, diff: float, tolerance: float, latency: dict | None) -> int:
    """The JSON summary every export format prints: its own fields, then the model, parity and latency."""
    summary = head | {
        "tasks": sidecar["outputs"],
        "params": sidecar["model"]["params"],
        "macs": sidecar["model"]["macs"],
        "parity_max_abs_diff": diff,
        "parity_tolerance": tolerance,
    }
    if sidecar["normalisation"] is None:
        summary["warning"] = ("no known dataset: the sidecar has no normalisation, so `cutfl infer` or an app cannot prepare "
                              "images; pass --dataset")
    if latency:
        summary["latency_ms"] = {k: round(latency[k], 4) for k in ("median_ms", "iqr_ms", "min_ms")}
        summary["latency_ms"].update(runs=latency["runs"], threads=latency["threads"], batch=1)
    print(json.dumps(summary, indent=2))
    return 0


def _export_executorch(args: argparse.Namespace) -> int:
    """`--format executorch`: model.pte + model.pte.json, parity in ExecuTorch's runtime, its latency."""
    import importlib.util

    from cut.export_executorch import INSTALL_HINT

    if importlib.util.find_spec("executorch") is None:  # before loading the model: one line, no traceback
        raise CliError(f"`cutfl export --format executorch` needs the executorch package, not installed here: "
                       f"{INSTALL_HINT}")
    from cut.checkpoint import load_model
    from cut.export_executorch import (
        DEFAULT_PTE_NAME,
        ExecutorchUnavailable,
        check_parity,
        export_executorch,
        measure_latency,
    )
    from cut.infer import sidecar_path

    model, card = load_model(args.model)
    out = args.out or Path(args.model) / DEFAULT_PTE_NAME
    try:
        sidecar = export_executorch(model, out, card=card, dataset=args.dataset)
        diff = check_parity(model, out, n=args.parity_samples, tol=args.tolerance)
        latency = (measure_latency(out, runs=args.latency_runs, warmup=args.warmup, threads=args.threads)
                   if args.latency_runs else None)
    except ExecutorchUnavailable as e:  # installed, but a part of it (its prebuilt runtime) does not load
        raise CliError(str(e)) from None
    head = {"pte": str(out), "sidecar": str(sidecar_path(out)), "exporter": sidecar["exporter"],
            "backend": sidecar["backend"], "delegation": sidecar["delegation"],
            "executorch_version": sidecar["executorch_version"], "bytes": sidecar["pte_bytes"]}
    return _print_export(head, sidecar, diff, args.tolerance, latency)


def cmd_infer(args: argparse.Namespace) -> int:
    """Run images through an exported model with onnxruntime only; one JSON line per image on stdout."""
    _require(("onnxruntime", "numpy", "PIL"), "infer", "pip install onnxruntime numpy pillow")
    from cut.infer import run_inference

    records = run_inference(args.model, args.images, args.out, threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
    for record in records:
        print(json.dumps(record))
    return 0


def add_commands(sub, parser_class: type[argparse.ArgumentParser]) -> None:
    """Register `export` and `infer` on the `cutfl` subparsers."""
    p = sub.add_parser("export", help="export a model directory to ONNX or ExecuTorch (+ sidecar JSON), check "
                                      "parity, time it")
    p.add_argument("--model", type=Path, required=True, help="model directory (model.json + weights.pt)")
    p.add_argument("--format", default="onnx", help="'onnx' (default) or 'executorch' (a .pte for phones, "
                                                    "XNNPACK-delegated, batch 1; needs the executorch package)")
    p.add_argument("--out", type=Path, help="file to write (default MODEL/model.onnx, or MODEL/model.pte with "
                                            "--format executorch; sidecar at OUT.json)")
    p.add_argument("--opset", type=int_at_least(17), default=17, help="ONNX opset version, >= 17 (default 17)")
    p.add_argument("--dataset", help="dataset whose pixel normalisation goes into the sidecar "
                                     "(default: the one named in the model card)")
    p.add_argument("--fixed-batch", action="store_true",
                   help="ONNX: export with batch size fixed to 1 (default: dynamic; an ExecuTorch .pte is always batch 1)")
    p.add_argument("--parity-samples", type=int_at_least(1), default=4,
                   help="random images compared between torch and the runtime (onnxruntime / ExecuTorch) (default 4)")
    p.add_argument("--tolerance", type=positive_float, default=1e-4,
                   help="largest allowed max abs torch/runtime difference (default 1e-4)")
    p.add_argument("--latency-runs", type=_latency_runs, default=50,
                   help=f"timed runtime runs at batch 1: 0 skips, else >= {MIN_LATENCY_RUNS} (default 50)")
    p.add_argument("--warmup", type=int_at_least(0), default=10, help="untimed warm-up runs before timing (default 10)")
    p.add_argument("--threads", type=int_at_least(1), default=1,
                   help="runtime CPU threads for timing: onnxruntime intra-op / ExecuTorch thread pool (default 1)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("infer", help="run images through an exported ONNX model (needs no torch)")
    p.add_argument("--model", type=Path, required=True,
                   help="an .onnx file with its .onnx.json sidecar, or a model directory holding model.onnx")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPG images to run")
    p.add_argument("--out", type=Path, default=Path("cutfl-infer"),
                   help="directory for <image>.<task>.png files and predictions.json (default ./cutfl-infer)")
    p.add_argument("--threads", type=int_at_least(1), help="onnxruntime intra-op threads (default: its own)")
    p.set_defaults(func=cmd_infer)


__all__ = ["add_commands", "cmd_export", "cmd_infer"]
