"""ExecuTorch export of a MultiTaskModel for phones: a `.pte` file, the same sidecar as the ONNX export,
a parity check in ExecuTorch's own runtime and a latency figure.

Path: `torch.export.export` (static shapes, batch fixed at export) -> `executorch.exir.
to_edge_transform_and_lower` with the XNNPACK partitioner (what ExecuTorch's Android and iOS runtimes
accelerate on CPU) -> `.to_executorch()` -> `model.pte`. What XNNPACK does not take stays on ExecuTorch's
portable kernels; the sidecar records how many graph nodes were delegated.

`executorch` is optional and imported only inside these functions: cut-fl does not depend on it. Its wheel
declares no torch requirement, so the version must be chosen to match torch (1.5.1 with torch 2.14.1, checked
here); it brings some 35 packages (coremltools, pandas, scikit-learn, torchao, ...), hence a venv of its own
(docs/DEPLOYMENT.md, section 5). Without it every function raises `ExecutorchUnavailable` naming the package
and the install.

The sidecar is `cut.export`'s (same input, normalisation, tasks and model blocks; written to
`model.pte.json`), with the ONNX-only fields replaced by `pte_file` / `pte_sha256` / `pte_bytes`, the
backend and the executorch version. Outputs are in task order (a `.pte` method returns a list, unnamed).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cut.export import (
    INPUT_NAME,
    PARITY_TOLERANCE,
    _sidecar,
    _TupleOutputs,
    checked_output,
    normalisation_for,
)
from cut.infer import check_latency_args, file_sha256, latency_summary, sidecar_path, time_runs
from cut.models import MultiTaskModel

SIDECAR_FORMAT = "cut-fl-executorch/1"
DEFAULT_PTE_NAME = "model.pte"  # what `cutfl export --format executorch` writes inside a model directory
BACKEND = "XnnpackBackend"
INSTALL_HINT = ("pip install executorch==1.5.1 beside torch 2.14.1, best in a venv of its own "
                "(docs/DEPLOYMENT.md, section 5)")


class ExecutorchUnavailable(RuntimeError):
    """The optional `executorch` package is missing (or its prebuilt runtime does not load)."""


def _require_executorch(part: str) -> Any:
    """Import one part of executorch, or raise ExecutorchUnavailable with the install hint."""
    import importlib

    try:
        return importlib.import_module(part)
    except ImportError as e:  # ModuleNotFoundError, or a prebuilt extension that does not load
        raise ExecutorchUnavailable(f"ExecuTorch export needs the `executorch` package ({e}): {INSTALL_HINT}") from None


def executorch_version() -> str:
    return str(getattr(_require_executorch("executorch.version"), "__version__", "unknown")).split("+")[0]


def export_executorch(
    model: MultiTaskModel,
    path: str | Path,
    batch: int = 1,
    card: dict[str, Any] | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Write `path` (ExecuTorch program, XNNPACK-delegated, input `[batch, C, H, W]`) and its sidecar.

    Returns the sidecar dict. `card` (a model card, see cut.checkpoint) supplies the dataset and provenance;
    `dataset` overrides it. The caller's model is not touched (an eval-mode deep copy is exported).
    """
    path = checked_output(path, ".pte", batch, dataset)
    exir = _require_executorch("executorch.exir")
    xnnpack = _require_executorch("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    backend_debug = _require_executorch("executorch.devtools.backend_debug")
    cfg = model.config
    wrapper = _TupleOutputs(copy.deepcopy(model)).eval()
    example = torch.zeros(batch, cfg.in_channels, *cfg.input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.export / exir announce deprecations of their own internals
        exported = torch.export.export(wrapper, (example,))
        edge = exir.to_edge_transform_and_lower(exported, partitioner=[xnnpack.XnnpackPartitioner()])
        info = backend_debug.get_delegation_info(edge.exported_program().graph_module)
        program = edge.to_executorch()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(program.buffer)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    card = card or {}
    dataset = dataset or card.get("dataset")
    base = _sidecar(model, path, 0, batch, False, "torch.export", normalisation_for(dataset, card.get("dataset_kwargs")),
                    card)
    for key in ("format", "onnx_file", "onnx_sha256", "onnx_bytes", "opset", "exporter"):
        base.pop(key)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "pte_file": path.name,
        "pte_sha256": file_sha256(path),
        "pte_bytes": path.stat().st_size,
        "method": "forward",
        "exporter": "torch.export + executorch.exir.to_edge_transform_and_lower",
        "backend": BACKEND,
        "delegation": {"subgraphs": info.num_delegated_subgraphs, "delegated_nodes": info.num_delegated_nodes,
                       "non_delegated_nodes": info.num_non_delegated_nodes},
        "executorch_version": executorch_version(),
        **base,
    }
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def load_method(pte_path: str | Path, threads: int | None = 1):
    """The `forward` method of a `.pte` file in ExecuTorch's Python runtime (`executorch.runtime`).

    `threads`: size of the runtime's CPU thread pool (XNNPACK's); None leaves the runtime's default.
    The pool is process-wide, so this changes it for every program loaded in this process.
    """
    runtime = _require_executorch("executorch.runtime")
    if threads:
        portable = _require_executorch("executorch.extension.pybindings.portable_lib")
        reset = getattr(portable, "_unsafe_reset_threadpool", None)  # experimental in executorch 1.5
        if reset is not None:
            reset(int(threads))
    program = runtime.Runtime.get().load_program(Path(pte_path))
    method = program.load_method("forward")
    if method is None:
        raise ValueError(f"{pte_path}: the ExecuTorch program has no `forward` method")
    return method


def thread_count() -> int | None:
    """The runtime's current CPU thread-pool size (None when this executorch cannot say)."""
    portable = _require_executorch("executorch.extension.pybindings.portable_lib")
    get = getattr(portable, "_threadpool_get_thread_count", None)
    return int(get()) if get is not None else None


def check_parity(model: MultiTaskModel, pte_path: str | Path, n: int = 4, seed: int = 0,
                 tol: float | None = None, batch: int = 1) -> float:
    """Max abs difference between torch and the ExecuTorch runtime over `n` random N(0,1) images, every task.

    Same inputs as cut.export.check_parity (seeded N(0,1), `batch` images a call: the batch the program
    was exported with). With `tol`, a larger difference (or a non-finite output) raises ValueError.
    """
    if n < 1:
        raise ValueError(f"parity needs n >= 1 images, got {n}")
    cfg = model.config
    names = list(model.task_names)
    reference = copy.deepcopy(model).eval()
    method = load_method(pte_path, threads=1)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(n):
        image = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=generator)
        with torch.no_grad():
            expected = reference(image)
        outputs = list(method.execute([image]))
        if len(outputs) != len(names):
            raise ValueError(f"{pte_path}: the program returns {len(outputs)} outputs, the model has {len(names)} tasks")
        for name, got in zip(names, outputs, strict=True):
            got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
            if got.shape != tuple(expected[name].shape):
                raise ValueError(f"{pte_path}: output {name!r} has shape {got.shape}, torch gives "
                                 f"{tuple(expected[name].shape)}")
            if not np.isfinite(got).all():
                raise ValueError(f"{pte_path}: ExecuTorch output {name!r} has non-finite values")
            worst = max(worst, float(np.abs(got - expected[name].numpy()).max()))
    if tol is not None and not worst <= tol:
        raise ValueError(f"{pte_path}: torch/ExecuTorch parity {worst:.3g} exceeds the tolerance {tol:g}")
    return worst


class _MethodSession:
    """An ExecuTorch method behind the `session.run(None, feed)` call that cut.infer.time_runs times."""

    def __init__(self, method) -> None:
        self.method = method

    def run(self, _names, feed: dict[str, torch.Tensor]):
        return self.method.execute([feed[INPUT_NAME]])


def measure_latency(pte_path: str | Path, runs: int = 50, warmup: int = 10, threads: int = 1,
                    seed: int = 0) -> dict[str, Any]:
    """ExecuTorch runtime CPU latency of one forward at the exported batch: median and IQR in ms.

    The same loop as cut.infer.measure_latency (`time_runs`: `warmup` untimed calls, then `runs` timed
    ones), on a seeded N(0,1) input of the shape the sidecar records; one pool thread by default.
    """
    check_latency_args(runs, warmup, threads)
    sidecar = json.loads(sidecar_path(pte_path).read_text())
    spec = sidecar["input"]
    shape = [int(spec["batch"]), spec["channels"], spec["height"], spec["width"]]
    method = load_method(pte_path, threads)
    feed = {INPUT_NAME: torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))}
    summary = latency_summary(time_runs(_MethodSession(method), feed, runs, warmup), warmup, threads, shape)
    return summary | {"pool_threads": thread_count()}


__all__ = [
    "BACKEND",
    "DEFAULT_PTE_NAME",
    "INSTALL_HINT",
    "PARITY_TOLERANCE",
    "SIDECAR_FORMAT",
    "ExecutorchUnavailable",
    "check_parity",
    "executorch_version",
    "export_executorch",
    "load_method",
    "measure_latency",
    "thread_count",
]
