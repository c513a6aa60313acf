"""ONNX export of a MultiTaskModel, with the sidecar a device needs, a parity check and a latency figure.

A device runs the compact model with onnxruntime only (see `cut.infer`), so everything torch knew
implicitly must travel next to the `.onnx` file in a small JSON sidecar (`model.onnx.json`): the input
layout and size, how pixels are normalised (the dataset's constants, `NORMALISATION`), and per task its
kind, class names and output name. Output names are the task names; the input is called `image`.

Exporter: torch 2.14 defaults to the torch.export-based ("dynamo") exporter, which needs the `onnxscript`
package (not installed here); the TorchScript-based exporter (`dynamo=False`) needs nothing beyond torch,
runs offline and matches torch to ~1e-7 (random weights) / ~5e-6 (pre-trained scenes model) max abs
difference, so it is used whenever it works; the dynamo exporter is only a fallback.
The legacy exporter runs a forward pass in the module's *current* mode, so export always works on an
eval-mode deep copy: the caller's model (its mode and BatchNorm statistics) is never touched.

Dense outputs are resized to the input size in the graph by two small constant matmuls (`MatmulResize`)
rather than a Resize node: the same bilinear weights, and on onnxruntime's CPU provider (1 thread) 4.7x
faster at 64x64 (15 vs 70 us for 8 classes), 4.0x at 256x256, 1.9x at 512x512. With the Shape arithmetic
the traced `size=x.shape[-2:]` brought, that was 9% of the default seg+depth model's time (1.106 -> 1.006
ms), a fixed cost every compact model paid alike (benchmarks/bench_resize.py, BENCHMARKS.md).

The dense heads are exported fused (`FusedDenseHeads`): every head's branches with the same dilation as one
conv, one 1x1 classifier conv per dilation for all heads, one resize for all dense outputs. The outputs are
the model's own (to float rounding: parity is checked); a pruned model's heads, thin convs that ran at a
fraction of a wide conv's MACs per second, run as wide ones (benchmarks/bench_fused_heads.py).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cut.infer import SIDECAR_FORMAT, cpu_session, file_sha256, measure_latency, sidecar_path
from cut.models import MultiTaskModel, count_macs, count_params

INPUT_NAME = "image"
MIN_OPSET = 17
PARITY_TOLERANCE = 1e-4
GRAPH_REVISION = 3  # bumped when the exported graph changes (cached latency tables key on it); 2: MatmulResize;
# 3: FusedDenseHeads

# How each dataset turns 8-bit pixels into the network's input, per channel c in `colour` order:
#     x[c] = (pixel[c] * scale - mean[c]) / std[c]
# Kept in step with cut/data/*.py (tests/test_export.py checks the constants against those modules).
_NYU_BGR_MEAN = [104.00698793, 116.66876762, 122.67891434]
_NYU_STD = 58.0
NORMALISATION: dict[str, dict[str, Any]] = {
    "scenes": {"colour": "rgb", "scale": 1 / 255, "mean": [0.45] * 3, "std": [0.25] * 3},
    "multifashion": {"colour": "grey", "scale": 1 / 255, "mean": [0.2751], "std": [0.3616]},
    "nyuv2": {"colour": "bgr", "scale": 1.0, "mean": _NYU_BGR_MEAN, "std": [_NYU_STD] * 3},
    "cityscapes": {"colour": "bgr", "scale": 1.0, "mean": _NYU_BGR_MEAN, "std": [_NYU_STD] * 3},
    "taskonomy": {"colour": "bgr", "scale": 1.0, "mean": _NYU_BGR_MEAN, "std": [_NYU_STD] * 3},
}
_FORMULA = "x[c] = (pixel[c] * scale - mean[c]) / std[c], pixel in 0..255, channels in `colour` order, NCHW"

# What each task kind's output tensor means, for someone writing a device app.
_OUTPUT_MEANING = {
    "segmentation": "N x C x H x W class logits; argmax over C gives the class of each pixel",
    "depth": "N x 1 x H x W depth in the units of the training data (scenes: distance along the optical axis)",
    "normals": "N x 3 x H x W surface normal (x, y, z), not unit length: normalise per pixel",
    "classification": "N x C class logits; softmax over C gives probabilities",
}


def bilinear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: 1-D bilinear resizing (align_corners=False) as a matrix, computed by F.interpolate itself."""
    eye = torch.eye(n_in).reshape(n_in, 1, n_in, 1)
    return F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T.contiguous()


class MatmulResize(nn.Module):
    """Bilinear resizing of an [N, C, h, w] map to a fixed (H, W) as rows @ y @ cols: bilinear weights are
    separable, so this is F.interpolate's result (to float rounding) with no Resize node and no shape ops."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", bilinear_weights(int(in_hw[0]), int(out_hw[0])))
        self.register_buffer("cols", bilinear_weights(int(in_hw[1]), int(out_hw[1])).T.contiguous())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.rows, torch.matmul(y, self.cols))


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by eval-mode BatchNorm as one conv."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.reshape(-1, 1, 1, 1), bias


def _branch_layout(branch: nn.Module) -> tuple | None:
    """The conv settings of a DenseHead branch (conv -> BN -> ReLU -> 1x1 conv), or None if it is not one."""
    parts = list(branch.children()) if isinstance(branch, nn.Sequential) else []
    if (len(parts) != 4 or not isinstance(parts[0], nn.Conv2d) or not isinstance(parts[1], nn.BatchNorm2d)
            or not isinstance(parts[2], nn.ReLU) or not isinstance(parts[3], nn.Conv2d)
            or parts[3].kernel_size != (1, 1) or parts[3].stride != (1, 1) or parts[0].groups != 1
            or parts[3].groups != 1 or parts[0].padding_mode != "zeros"):
        return None
    c = parts[0]
    return c.in_channels, c.kernel_size, c.stride, c.padding, c.dilation


class FusedDenseHeads(nn.Module):
    """Every dense head of a model as one computation, for the exported graph: the same outputs (to float
    rounding) from fewer, wider convs.

    Each head is a sum of branches conv(dilation d) -> BN -> ReLU -> 1x1 conv, all reading the backbone's
    features. Branches of any head with the same conv settings become one conv (BN folded in) whose output
    channels are theirs side by side; each fused conv gets one 1x1 conv to every head's outputs (a head's
    rows read only its own branches' channels, zeros elsewhere), and their sum is every head's sum of
    branches at once; one `MatmulResize` resizes every dense output together, split per task at the end. A
    pruned head's thin branches are where a compact model ran slowest per MAC; side by side they run as one
    wider conv.
    """

    def __init__(self, heads: dict[str, nn.Module], in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.names = list(heads)
        layouts: list[tuple] = []
        weights: dict[tuple, list[torch.Tensor]] = {}
        biases: dict[tuple, list[torch.Tensor]] = {}
        hidden: dict[str, list[tuple[tuple, int, int]]] = {n: [] for n in self.names}  # (layout, start, count)
        for name, head in heads.items():
            for branch in head.branches:
                layout = _branch_layout(branch)
                if layout not in weights:
                    layouts.append(layout)
                    weights[layout], biases[layout] = [], []
                w, b = _folded(branch[0], branch[1])
                start = sum(x.shape[0] for x in weights[layout])
                weights[layout].append(w)
                biases[layout].append(b)
                hidden[name].append((layout, start, w.shape[0]))
        self.convs = nn.ModuleList()
        for layout in layouts:
            cin, kernel, stride, padding, dilation = layout
            w, b = torch.cat(weights[layout]), torch.cat(biases[layout])
            conv = nn.Conv2d(cin, w.shape[0], kernel, stride, padding, dilation)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(b)
            self.convs.append(conv)
        self.sizes = [int(head.branches[0][3].out_channels) for head in heads.values()]
        self.classify = nn.ModuleList()  # per fused conv: 1x1 from its hidden channels to every head's outputs
        for conv in self.convs:
            classify = nn.Conv2d(conv.out_channels, sum(self.sizes), 1, bias=not len(self.classify))
            nn.init.zeros_(classify.weight)
            self.classify.append(classify)
        first = self.classify[0]
        nn.init.zeros_(first.bias)
        row = 0
        for name, head, size in zip(self.names, heads.values(), self.sizes, strict=True):
            for branch, (layout, start, count) in zip(head.branches, hidden[name], strict=True):
                classify = self.classify[layouts.index(layout)]
                classify.weight.data[row:row + size, start:start + count] = branch[3].weight.data
                if branch[3].bias is not None:
                    first.bias.data[row:row + size] += branch[3].bias.data
            row += size
        self.resize = MatmulResize(in_hw, out_hw)

    @staticmethod
    def fusable(heads: dict[str, nn.Module]) -> bool:
        """Whether every head is a sum of branches this class can fuse (each with the same output count)."""
        for head in heads.values():
            branches = getattr(head, "branches", None)
            if not isinstance(branches, nn.ModuleList) or not len(branches):
                return False
            if any(_branch_layout(b) is None for b in branches):
                return False
            if len({b[3].out_channels for b in branches}) != 1:
                return False
        return bool(heads)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        out = None
        for conv, classify in zip(self.convs, self.classify, strict=True):
            y = classify(torch.relu(conv(features)))
            out = y if out is None else out + y
        out = self.resize(out)
        if len(self.names) == 1:
            return {self.names[0]: out}
        return dict(zip(self.names, torch.split(out, self.sizes, dim=1), strict=True))


class _TupleOutputs(nn.Module):
    """ONNX export needs a fixed output order: the dict output becomes a tuple in task order.

    With `example` (a MultiTaskModel and the export's input), dense outputs are resized by `MatmulResize`
    instead of the model's own F.interpolate, and the dense heads run fused (`FusedDenseHeads`) where they
    are the model's own kind; without it (ExecuTorch: XNNPACK has its own resize, custom models) the
    model's forward runs as it is.
    """

    def __init__(self, model: MultiTaskModel, example: torch.Tensor | None = None, fuse_heads: bool = True) -> None:
        super().__init__()
        self.model = model
        self.names = list(model.task_names)
        self.resize = nn.ModuleDict()
        self.fused: FusedDenseHeads | None = None
        self.raw = example is not None and callable(getattr(model, "head_outputs", None))
        if self.raw:
            with torch.no_grad():
                raw = model.head_outputs(example)
            standard = isinstance(model, MultiTaskModel) and type(model).head_outputs is MultiTaskModel.head_outputs
            dense = {n: model.heads[n] for n, y in raw.items() if y.dim() == 4} if standard and fuse_heads else {}
            in_hw = {tuple(raw[n].shape[-2:]) for n in dense}
            if len(in_hw) == 1 and FusedDenseHeads.fusable(dense):
                with torch.no_grad():
                    self.fused = FusedDenseHeads(dense, in_hw.pop(), tuple(example.shape[-2:]))
            for name, y in raw.items():
                if y.dim() == 4 and (self.fused is None or name not in self.fused.names):
                    self.resize[name] = MatmulResize(tuple(y.shape[-2:]), tuple(example.shape[-2:]))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.raw:
            out = self.model(image)
            return tuple(out[n] for n in self.names)
        if self.fused is None:
            out = self.model.head_outputs(image)
        else:
            features = self.model.backbone(image)
            out = self.fused(features)
            out.update({n: self.model.heads[n](features) for n in self.names if n not in out})
        return tuple(self.resize[n](out[n]) if n in self.resize else out[n] for n in self.names)


def normalisation_for(dataset: str | None, dataset_kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The sidecar's normalisation block for `dataset` (None when unknown: infer then refuses to guess)."""
    if dataset not in NORMALISATION:
        return None
    norm = copy.deepcopy(NORMALISATION[dataset])
    std = (dataset_kwargs or {}).get("std")
    if norm["colour"] == "bgr" and std:  # the real-data loaders take the divisor as a keyword
        norm["std"] = [float(std)] * 3
    return {"dataset": dataset, **norm, "formula": _FORMULA}


def checked_output(path: str | Path, suffix: str, batch: int, dataset: str | None) -> Path:
    """The output path of an export, its folder made, after checking what every exporter needs."""
    if dataset is not None and dataset not in NORMALISATION:
        raise ValueError(f"no pixel normalisation known for dataset {dataset!r}; known: {', '.join(NORMALISATION)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{path}: the output file name must end in {suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def export_onnx(
    model: MultiTaskModel,
    path: str | Path,
    opset: int = MIN_OPSET,
    batch: int = 1,
    dynamic_batch: bool = True,
    card: dict[str, Any] | None = None,
    dataset: str | None = None,
    fuse_heads: bool = True,
) -> dict[str, Any]:
    """Write `path` (ONNX, one output per task) and its sidecar; returns the sidecar dict.

    `card` (a model card, see cut.checkpoint) supplies the dataset and provenance; `dataset` overrides it.
    `fuse_heads=False` exports every head as its own convs (`FusedDenseHeads` is the default: the same
    outputs, faster; the switch is for comparing the two).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: use {MIN_OPSET} or newer")
    path = checked_output(path, ".onnx", batch, dataset)
    cfg = model.config
    names = list(model.task_names)
    example = torch.zeros(batch, cfg.in_channels, *cfg.input_size)
    wrapper = _TupleOutputs(copy.deepcopy(model).eval(), example, fuse_heads).eval()
    axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]} if dynamic_batch else None
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        exporter = _export(wrapper, example, tmp, opset, names, axes)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    check_onnx(path, names)
    card = card or {}
    dataset = dataset or card.get("dataset")
    sidecar = _sidecar(model, path, opset, batch, dynamic_batch, exporter,
                       normalisation_for(dataset, card.get("dataset_kwargs")), card)
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _export(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, names: list[str],
            axes: dict[str, dict[int, str]] | None) -> str:
    """Run torch.onnx.export offline; returns which exporter produced the file ("torchscript" or "dynamo")."""
    kwargs: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=names, opset_version=opset,
                                  do_constant_folding=True)
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its deprecation
        try:
            torch.onnx.export(wrapper, (example,), str(path), dynamic_axes=axes, **legacy, **kwargs)
            return "torchscript"
        except Exception as legacy_error:
            if importlib.util.find_spec("onnxscript") is None:
                raise
            try:
                return _export_dynamo(wrapper, example, path, kwargs, axes is not None)
            except Exception:
                raise legacy_error from None


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path, kwargs: dict[str, Any],
                   dynamic: bool) -> str:
    """Fallback for a torch whose TorchScript exporter fails or is gone: needs `onnxscript` (still offline).

    Not exercised here (this environment has no onnxscript); the result still goes through check_onnx.
    """
    shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    torch.onnx.export(wrapper, (example,), str(path), dynamo=True, dynamic_shapes=shapes, external_data=False,
                      **kwargs)
    return "dynamo"


def check_onnx(path: str | Path, task_names: list[str]) -> None:
    """onnx.checker (full, with shape inference) plus our own contract: input `image`, outputs = tasks."""
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(task_names):
        raise RuntimeError(f"{path}: exported inputs {inputs} / outputs {outputs}, expected "
                           f"[{INPUT_NAME!r}] / {task_names}")


def _sidecar(model: MultiTaskModel, path: Path, opset: int, batch: int, dynamic_batch: bool, exporter: str,
             normalisation: dict[str, Any] | None, card: dict[str, Any]) -> dict[str, Any]:
    cfg = model.config
    height, width = cfg.input_size
    tasks = []
    for spec in cfg.tasks:
        dense = spec.task_kind.dense
        tasks.append({
            "name": spec.name,
            "kind": spec.kind,
            "output": spec.name,
            "num_classes": spec.num_classes if spec.kind in ("segmentation", "classification") else 0,
            "class_names": list(spec.class_names),
            "shape": ["batch" if dynamic_batch else batch, spec.out_channels, *([height, width] if dense else [])],
            "meaning": _OUTPUT_MEANING[spec.kind],
        })
    plan = card.get("plan") or {}
    return {
        "format": SIDECAR_FORMAT,
        "onnx_file": path.name,
        "onnx_sha256": file_sha256(path),
        "onnx_bytes": path.stat().st_size,
        "opset": opset,
        "exporter": exporter,
        "torch_version": torch.__version__.split("+")[0],
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "batch": "dynamic" if dynamic_batch else batch,
            "channels": cfg.in_channels,
            "height": height,
            "width": width,
        },
        "normalisation": normalisation,
        "tasks": tasks,
        "outputs": [t["name"] for t in tasks],
        "model": {
            "backbone": cfg.backbone,
            "width": cfg.width,
            "params": count_params(model),
            "macs": count_macs(model),
            "weights_sha256": card.get("weights_sha256", ""),
            "plan_hash": plan.get("plan_hash", ""),
            "budget": {"kind": plan["budget_kind"], "value": plan["budget_value"]} if plan else None,
        },
    }


def check_parity(model: MultiTaskModel, onnx_path: str | Path, n: int = 4, seed: int = 0,
                 tol: float | None = None) -> float:
    """Max abs difference between torch and onnxruntime over `n` random N(0,1) images, every task.

    Images run one at a time (batch 1 is what a device runs), or in the batch a fixed-batch export needs.
    With `tol`, a larger difference (or a non-finite output) raises ValueError.
    """
    if n < 1:
        raise ValueError(f"parity needs n >= 1 images, got {n}")
    cfg = model.config
    names = list(model.task_names)
    reference = copy.deepcopy(model).eval()
    session = cpu_session(onnx_path, threads=1)
    fixed = session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else 1
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(n):
        image = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=generator)
        with torch.no_grad():
            expected = reference(image)
        got = dict(zip(names, session.run(names, {INPUT_NAME: image.numpy()}), strict=True))
        for name in names:
            if not np.isfinite(got[name]).all():
                raise ValueError(f"{onnx_path}: onnxruntime output {name!r} has non-finite values")
            worst = max(worst, float(np.abs(got[name] - expected[name].numpy()).max()))
    if tol is not None and not worst <= tol:
        raise ValueError(f"{onnx_path}: torch/onnxruntime parity {worst:.3g} exceeds the tolerance {tol:g}")
    return worst


__all__ = [
    "INPUT_NAME",
    "NORMALISATION",
    "PARITY_TOLERANCE",
    "SIDECAR_FORMAT",
    "check_onnx",
    "checked_output",
    "check_parity",
    "export_onnx",
    "file_sha256",
    "measure_latency",
    "normalisation_for",
    "sidecar_path",
]
