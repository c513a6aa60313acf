"""A memory budget: the bytes a device needs to run the compact model at batch 1 (issue 16).

    memory = weight bytes + peak activation bytes

- weight bytes: 4 (float32) per parameter of the model (every `nn.Parameter`; BatchNorm running
  statistics are buffers, folded into the convolutions by any runtime, and not counted);
- peak activation bytes: the largest, over every Conv2d / Linear, of 4 x (elements of its input + elements
  of its output) for one image at the config's input size: the two tensors that must be live while that
  layer runs.

The peak is an approximation, documented as such: a runtime also holds a residual's identity while its
block runs, the heads' outputs upsampled to the input size, and scratch space (im2col), and it may run
BatchNorm / ReLU in place or fuse layers. What it does capture is what a plan controls: every layer's
input and output shrink with the channels kept, so both terms fall as the model is cut.

In kept channels per group, weight bytes are 4 x the analytic parameter count (`cut.groups.CostModel`)
and each layer's activation bytes are linear (`cut.groups.LayerShape`: its channels follow a group or are
fixed, its positions come from the analysis' one forward pass), so `MemoryCost` prices any plan in
microseconds without building it. The peak is a max over layers, not a sum over channels: the planner
(`cut.budget.make_plan`) checks every candidate against this exact figure (its searches evaluate the whole
kept-count vector, and memory is monotone in every count), and only its ranking, which needs what one
channel of each group costs, uses an additive stand-in (`MemoryCost.rank_cost`: weight bytes + the *sum*
of all layers' activation bytes), so channels that carry large activations are the ones traded first.

`model_memory` measures the same figure on a real module (its own forward pass, its own parameters):
what the planner predicted for a plan equals what the compact model it builds measures.

A budget is `memory=F` (a fraction in (0, 1] of the dense decomposed model's memory) or an absolute size,
`memory=3MB` (decimal B, KB, MB, GB, TB or binary KiB, MiB, GiB, TiB; `parse_memory_budget`), converted
to a fraction of the dense figure by `memory_fraction`: a size at or above the dense model's memory
prunes nothing (as `latency=Xms` above the dense time does); one below what the smallest model the
planner may build needs is refused with both figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cut.messages import MAX_MEMORY_BYTES

if TYPE_CHECKING:  # numpy only at import: parsing a budget on a device needs no torch
    from torch import nn

    from cut.groups import CostModel, GroupAnalysis, LayerShape

MEMORY = "memory"
BYTES_PER_VALUE = 4  # float32 weights and activations
MAX_BYTES = MAX_MEMORY_BYTES  # the largest size a budget may name (1 PB): bounds what travels in a Budget
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"(.*?)\s*([A-Za-z]+)")


class MemoryCost:
    """A `cut.groups.CostModel` whose "memory" kind is weight bytes + peak activation bytes (module docstring).

    Params and MACs (and everything else) come from the analytic cost model it wraps.
    """

    def __init__(self, base: CostModel, layers: Sequence[LayerShape]) -> None:
        self.base = base
        self.layers = tuple(layers)
        self.in_group = np.asarray([t.in_group for t in layers], dtype=np.int64)
        self.out_group = np.asarray([t.out_group for t in layers], dtype=np.int64)
        self.in_fixed = np.asarray([t.in_channels for t in layers], dtype=np.float64)
        self.out_fixed = np.asarray([t.out_channels for t in layers], dtype=np.float64)
        self.in_positions = np.asarray([t.in_positions for t in layers], dtype=np.float64)
        self.out_positions = np.asarray([t.out_positions for t in layers], dtype=np.float64)

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def activation_bytes(self, kept: np.ndarray) -> np.ndarray:
        """Per layer: bytes of its input + output for one image at `kept[i]` channels in group i."""
        ext = np.append(np.asarray(kept, dtype=np.float64), 0.0)  # index -1 reads the padding; masked below
        cin = np.where(self.in_group >= 0, ext[self.in_group], self.in_fixed)
        cout = np.where(self.out_group >= 0, ext[self.out_group], self.out_fixed)
        return BYTES_PER_VALUE * (cin * self.in_positions + cout * self.out_positions)

    def weight_bytes(self, kept: np.ndarray) -> int:
        return BYTES_PER_VALUE * self.base.evaluate(kept)[0]

    def peak_bytes(self, kept: np.ndarray) -> int:
        acts = self.activation_bytes(kept)
        return int(round(float(acts.max()))) if len(acts) else 0

    def memory_bytes(self, kept: np.ndarray) -> int:
        return self.weight_bytes(kept) + self.peak_bytes(kept)

    def cost(self, kind: str, kept: np.ndarray) -> int:
        if kind == MEMORY:
            return self.memory_bytes(kept)
        return self.base.cost(kind, kept)

    def dense(self, kind: str) -> int:
        return self.cost(kind, self.base.group_sizes)

    def rank_cost(self, kind: str, kept: np.ndarray) -> float:
        """The additive figure the planner ranks channels by: weight bytes + the sum of every layer's
        activation bytes (the budget itself is checked against `cost`, whose peak is a max)."""
        if kind != MEMORY:
            return self.cost(kind, kept)
        return self.weight_bytes(kept) + float(self.activation_bytes(kept).sum())


def memory_cost(analysis: GroupAnalysis) -> MemoryCost:
    """The planner's memory cost model of the analysed model."""
    if not analysis.layers:
        raise ValueError("a memory budget needs the layer shapes of the analysis (cut.groups.analyse records them)")
    return MemoryCost(analysis.cost, analysis.layers)


def model_memory(model: nn.Module) -> dict[str, Any]:
    """Measured on `model` itself (one forward pass on zeros at its config's input size, batch 1):
    weight_bytes, activation_bytes (the peak), memory_bytes (their sum) and peak_layer (where the peak is)."""
    from cut.groups import probe_layers

    peak, where = 0, ""

    def record(name, module, inputs, output) -> None:
        nonlocal peak, where
        size = BYTES_PER_VALUE * (inputs[0].numel() + output.numel()) // inputs[0].shape[0]
        if size > peak:
            peak, where = size, name

    probe_layers(model, record)
    weights = BYTES_PER_VALUE * sum(p.numel() for p in model.parameters())
    return {"weight_bytes": int(weights), "activation_bytes": int(peak), "memory_bytes": int(weights + peak),
            "peak_layer": where}


def parse_size(text: str) -> float:
    """'3MB', '512 KiB', '1.5e6B' -> bytes; ValueError naming the problem (no unit, not a number, <= 0)."""
    s = str(text).strip()
    match = _SIZE.fullmatch(s)
    unit = match.group(2).lower() if match else ""
    if unit not in UNITS:
        raise ValueError(f"{text!r} is not a size: write a number and a unit (B, KB, MB, GB, TB or KiB, MiB, GiB, "
                         "TiB), e.g. 3MB")
    try:
        number = float(match.group(1))
    except ValueError:
        raise ValueError(f"{text!r} is not a size: {match.group(1)!r} is not a number") from None
    nbytes = number * UNITS[unit]
    if not math.isfinite(nbytes) or nbytes < 1:
        raise ValueError(f"{text!r} is not a size: it must be a positive number of bytes (at least 1B)")
    if nbytes > MAX_BYTES:
        raise ValueError(f"{text!r} is above the largest size a budget may name ({format_bytes(MAX_BYTES)})")
    return nbytes


def parse_memory_budget(text: str) -> tuple[float, float]:
    """The value of `memory=...`: (fraction, 0) for 'F' in (0, 1], or (1.0, bytes) for a size like '3MB'.

    ValueError naming the problem otherwise (the message starts with "memory budget").
    """
    s = str(text).strip()
    try:
        fraction = float(s)
    except ValueError:
        try:
            return 1.0, parse_size(s)
        except ValueError as e:
            if s and (s[0].isdigit() or s[0] in "+-."):
                raise ValueError(f"memory budget {e}") from None
            raise ValueError(f"memory budget {text!r} is neither a fraction in (0, 1] nor a size like 3MB") from None
    if not math.isfinite(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"memory budget {text!r} must be a fraction in (0, 1] of the dense model's memory, or a "
                         "size like 3MB")
    return fraction, 0.0


def memory_fraction(analysis: GroupAnalysis, nbytes: float, options: Any = None) -> float:
    """`nbytes` as the fraction of the dense analysed model's memory that a plan may use: min(1, bytes / dense).

    ValueError, with both sizes, if even the smallest model the planner may build (every group at its
    fewest allowed channels under `options`, a `cut.budget.BudgetOptions`) needs more than `nbytes`.
    """
    from cut.budget import BudgetOptions, group_allowed

    cost = memory_cost(analysis)
    dense = cost.dense(MEMORY)
    allowed = group_allowed(cost, options or BudgetOptions())
    smallest = cost.cost(MEMORY, np.asarray([allowed[g][0] for g in cost.group_names], dtype=np.float64))
    if nbytes < smallest:
        raise ValueError(f"memory budget {format_bytes(nbytes)} is unreachable: the smallest model the planner may "
                         f"build (every channel group at its minimum) needs {format_bytes(smallest)} "
                         f"({smallest / dense:.4f} of the dense model's {format_bytes(dense)})")
    return min(1.0, nbytes / dense)


def format_bytes(nbytes: float) -> str:
    """12345678 -> '12.35 MB' (decimal units, as budgets are usually written)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes:.4g} B"


__all__ = [
    "BYTES_PER_VALUE",
    "MAX_BYTES",
    "MEMORY",
    "UNITS",
    "MemoryCost",
    "format_bytes",
    "memory_cost",
    "memory_fraction",
    "model_memory",
    "parse_memory_budget",
    "parse_size",
]
