"""A latency cost model measured on the machine that will run the model (onnxruntime, batch 1).

Parameters and MACs follow from shapes; time does not: per-call overheads, vector widths and layer
shapes decide it (issue 16: at params 0.5 the compact models ran only 0.76x as fast as their MAC
reduction promised). So a device times its own runtime and the planner budgets against that table.

The table (`LatencyTable`), measured in a few seconds and cached per (base model sha256, tasks, input
size, runtime, threads):

- per Conv2d / Linear layer of the decomposed model, the time of that layer exported alone (a probe
  graph of a few copies of its node side by side, with its input shape; BatchNorm is folded into the conv
  by the runtime, ReLU fused) at a grid of kept input x output channels, less the runtime's per-call cost
  (`call_overhead_us`, paid once by the whole model, not per layer), timed in interleaved sweeps
  (`layer_times`); a layer's count follows the group controlling it, or is fixed;
- `round_to`: the channel multiple this runtime runs fastest, measured on a probe conv (for each
  multiple m, is rounding a count up to m free?) rather than assumed;
- a calibration from whole-model probes (the dense decomposed model and uniformly thinned ones, timed
  interleaved): the measured time as a piecewise-linear, non-decreasing function of the sum of layer
  times through the probes, so the graph's fixed cost (resizes, adds, dispatch: the overhead) and the
  in-graph vs alone difference are absorbed. A straight line (overhead + scale * sum) was tried first:
  on this machine its fitted overhead came out negative and it missed the 0.5 probe by 14%.

Where the planning machine is the one that runs the model (`cutfl prune`), `check_plan` also times the plan
whole beside the dense model before recovery and, while it measures off the asked fraction by more than
`CHECK_TOLERANCE`, adds the measurement to the calibration and plans again (at most `MAX_CHECKS` plans): the
uniform probes calibrate where uniform models land, and a plan that thins some groups far more than others can
land elsewhere (on one host, plans at 0.5 measured 10-16% above the table's prediction; in the simulated fleet,
three-task plans at 0.7 measured 7% below it). A measured plan scales the probes' curve around its sum by
measured / predicted, fading to 1 at the dense model (`_corrected`): the probes keep the shape.

`LatencyCost` turns a table into a cost model like `cut.groups.CostModel`: cost("latency", kept)
interpolates every layer's time bilinearly at its kept (in, out) counts, sums them and maps the sum
through the calibration (in nanoseconds, so per-channel savings stay above the planner's floor of 1 unit). Costs are additive per
layer and monotone in every count (the measured grids are made monotone), as the planner's search
assumes. Groups whose pruning to their minimum saves less than `MIN_SAVING` of the dense time are left
whole for a latency budget (`no_saving_groups`).

torch is needed to measure (the model's shapes, the whole-model probes); planning from a table that
arrived over the wire needs only numpy. onnx / onnxruntime are imported lazily, as in cut.infer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

TABLE_FORMAT = "cut-fl-latency/1"
MAX_GRID = 6  # points per axis of a layer's grid
MAX_CALIBRATION = 8  # calibration points: the whole-model probes and up to 3 measured plans (`check_plan`)
MEASURED_PLAN = -1.0  # a calibration point's probe fraction when it is a measured plan, not a uniform probe
MAX_LAYERS = 4096  # a table describes at most this many layers (wire bound, cut.messages)
MIN_SAVING = 0.01  # a group saving less than this fraction of the dense time is not pruned for latency
ROUND_CANDIDATES = (1, 2, 4, 8, 16, 32)
ROUND_TOLERANCE = 0.03  # rounding up to a multiple is "free" if it costs at most this much time (median)
LAYER_RUNS = 15
LAYER_WARMUP = 3
PROBE_COPIES = 4  # copies of a layer in its probe graph
SWEEPS = 3  # interleaved timing sweeps over every probe
PROBES_AT_ONCE = 128  # probe sessions alive at a time (each holds `PROBE_COPIES` copies of a layer's weights)
WHOLE_WARMUP = 5
REPEATS = 3  # a plan timed beside its dense model: the median of this many interleaved timings (`timed_fraction`)
PROBE_FRACTIONS = (1.0, 0.75, 0.5, 0.3, 0.15)  # whole-model probes for the calibration: dense and two thinned


@dataclass(frozen=True)
class LayerTiming:
    """One layer's measured time (microseconds) at `cin[i]` input x `cout[j]` output channels."""

    name: str
    cin: tuple[int, ...]
    cout: tuple[int, ...]
    us: tuple[tuple[float, ...], ...]

    def check(self) -> None:
        if not self.cin or not self.cout or len(self.cin) > MAX_GRID or len(self.cout) > MAX_GRID:
            raise ValueError(f"latency table layer {self.name!r}: grid must have 1..{MAX_GRID} points per axis")
        for axis in (self.cin, self.cout):
            if any(int(c) != c or c < 1 for c in axis) or list(axis) != sorted(set(axis)):
                raise ValueError(f"latency table layer {self.name!r}: channel grid {axis} must be increasing "
                                 "positive integers")
        if len(self.us) != len(self.cin) or any(len(row) != len(self.cout) for row in self.us):
            raise ValueError(f"latency table layer {self.name!r}: times are not {len(self.cin)} x {len(self.cout)}")
        if not all(math.isfinite(t) and 0 <= t < 1e9 for row in self.us for t in row):
            raise ValueError(f"latency table layer {self.name!r}: times must be finite, >= 0 and < 1e9 us")


@dataclass(frozen=True)
class LatencyTable:
    """What a device measured about its runtime for one decomposed model (see the module docstring)."""

    base_model_sha256: str
    tasks: tuple[str, ...]
    input_size: tuple[int, int]
    runtime: str  # e.g. "onnxruntime 1.32.0 CPU"
    threads: int
    round_to: int
    calibration: tuple[tuple[float, float], ...]  # (sum of layer times ms, measured whole-model ms), by sum
    dense_ms: float  # measured median of the dense decomposed model
    layers: tuple[LayerTiming, ...]
    probes: tuple[float, ...] = ()  # uniform keep fraction of each calibration point (-1: a measured plan)
    seconds: float = 0.0  # how long measuring took
    format: str = TABLE_FORMAT

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ValueError naming the problem unless the table is usable (also run on a table from the wire)."""
        if self.format != TABLE_FORMAT:
            raise ValueError(f"latency table format {self.format!r} is not {TABLE_FORMAT!r}")
        if not self.layers or len(self.layers) > MAX_LAYERS:
            raise ValueError(f"latency table must describe 1..{MAX_LAYERS} layers, got {len(self.layers)}")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("latency table names a layer twice")
        for layer in self.layers:
            layer.check()
        if len(self.input_size) != 2 or not all(isinstance(v, int) and 1 <= v <= 1 << 16 for v in self.input_size):
            raise ValueError(f"latency table input_size {self.input_size!r} must be (H, W) in 1..65536")
        if not (isinstance(self.threads, int) and 1 <= self.threads <= 1024):
            raise ValueError(f"latency table threads {self.threads!r} must be 1..1024")
        if self.round_to not in ROUND_CANDIDATES:
            raise ValueError(f"latency table round_to {self.round_to!r} must be one of {ROUND_CANDIDATES}")
        if not 1 <= len(self.calibration) <= MAX_CALIBRATION:
            raise ValueError(f"latency table needs 1..{MAX_CALIBRATION} calibration points, got "
                             f"{len(self.calibration)}")
        values = [v for point in self.calibration for v in point] + [self.dense_ms]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v < 1e7 for v in values):
            raise ValueError("latency table calibration and dense_ms must be finite and in (0, 1e7) ms")
        sums = [point[0] for point in self.calibration]
        if sums != sorted(set(sums)):
            raise ValueError("latency table calibration points must be sorted by increasing layer-time sum")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        try:
            layers = tuple(LayerTiming(str(x["name"]), tuple(int(c) for c in x["cin"]),
                                       tuple(int(c) for c in x["cout"]),
                                       tuple(tuple(float(t) for t in row) for row in x["us"]))
                           for x in data["layers"])
            return cls(
                base_model_sha256=str(data["base_model_sha256"]), tasks=tuple(str(t) for t in data["tasks"]),
                input_size=tuple(int(v) for v in data["input_size"]), runtime=str(data["runtime"]),
                threads=int(data["threads"]), round_to=int(data["round_to"]),
                calibration=tuple((float(a), float(b)) for a, b in data["calibration"]),
                dense_ms=float(data["dense_ms"]), layers=layers,
                probes=tuple(float(f) for f in data.get("probes", ())),
                seconds=float(data.get("seconds", 0.0)), format=str(data.get("format", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and str(e).startswith("latency table"):
                raise
            raise ValueError(f"not a latency table: {type(e).__name__} {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# ----------------------------------------------------------------------------------------------------
# The cost model the planner uses


@dataclass
class _Layer:
    in_group: int
    out_group: int
    cin: np.ndarray
    cout: np.ndarray
    us: np.ndarray  # monotone in both axes


def _monotone(us: np.ndarray) -> np.ndarray:
    """Non-decreasing along both axes: more channels never cost less time (the planner assumes it)."""
    return np.maximum.accumulate(np.maximum.accumulate(us, axis=0), axis=1)


def _interp_axis(grid: np.ndarray, x: float) -> tuple[int, int, float]:
    if len(grid) == 1:
        return 0, 0, 0.0
    x = min(max(x, 0.0), float(grid[-1]))
    j = int(np.clip(np.searchsorted(grid, x) - 1, 0, len(grid) - 2))
    lo, hi = float(grid[j]), float(grid[j + 1])
    return j, j + 1, (x - lo) / (hi - lo)  # below the first point: extrapolate linearly towards 0


def _corrected(curve, sums: np.ndarray, plans: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """The calibration through the uniform probes (`curve` at `sums`), scaled by what measured plans say.

    Each measured plan (sum, ms) gives a factor ms / curve(sum): how much faster or slower than the uniform
    probes a plan of that sum ran. The factor is interpolated between the plans by sum, held below the lowest,
    and fades to 1 at the largest probe (the dense model, whose time every fraction divides). The probes keep
    the shape, the plans move it: inserting the plan as one more point instead made a near-vertical segment
    wherever a plan landed near a probe it disagreed with, and planning again gave the same plan
    (BENCHMARKS.md, the federation's latency checks, runs 7-8)."""
    anchor = float(sums[-1])
    at = [s for s, _ in plans]
    factors = [ms / curve(s) for s, ms in plans]
    knots = np.asarray(sorted({*map(float, sums), *at}), float)
    scale = np.interp(knots, [*at, anchor], [*factors, 1.0])
    # non-decreasing, and never above the dense model (a plan timed slower than it is noise, not a new anchor)
    return knots, np.minimum(np.maximum.accumulate(np.asarray([curve(k) for k in knots]) * scale), curve(anchor))


class LatencyCost:
    """A `cut.groups.CostModel` whose "latency" kind is the table's prediction (nanoseconds).

    Params and MACs (and everything else) come from the analytic cost model it wraps.
    """

    def __init__(self, base, layers: Sequence[_Layer], calibration: Sequence[tuple[float, float]],
                 probes: Sequence[float] = ()) -> None:
        self.base = base
        self.layers = list(layers)
        flags = list(probes) if len(probes) == len(calibration) else [0.0] * len(calibration)
        if all(f == MEASURED_PLAN for f in flags):  # no uniform probe to scale: take the points as they are
            flags = [0.0] * len(flags)
        points = sorted(zip(calibration, flags, strict=True))
        uniform = [p for p, f in points if f != MEASURED_PLAN]
        self.sums = np.asarray([p[0] for p in uniform], float)
        self.measured = np.maximum.accumulate(np.asarray([p[1] for p in uniform], float))  # non-decreasing
        plans = [p for p, f in points if f == MEASURED_PLAN and p[0] < self.sums[-1]]
        if plans:
            self.sums, self.measured = _corrected(self.calibrate, self.sums, plans)

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def latency_ns(self, kept: np.ndarray) -> float:
        return self.calibrate(self.layer_sum_ms(kept)) * 1e6

    def layer_sum_ms(self, kept: np.ndarray) -> float:
        """The sum of the table's layer times at `kept` channels (before the calibration), ms."""
        kept = np.asarray(kept, dtype=np.float64)
        total_us = 0.0
        for layer in self.layers:
            cin = kept[layer.in_group] if layer.in_group >= 0 else float(layer.cin[-1])
            cout = kept[layer.out_group] if layer.out_group >= 0 else float(layer.cout[-1])
            i0, i1, fi = _interp_axis(layer.cin, cin)
            j0, j1, fj = _interp_axis(layer.cout, cout)
            u = layer.us
            total_us += ((1 - fi) * ((1 - fj) * u[i0, j0] + fj * u[i0, j1])
                         + fi * ((1 - fj) * u[i1, j0] + fj * u[i1, j1]))
        return total_us / 1e3

    def calibrate(self, sum_ms: float) -> float:
        """Whole-model ms for a sum of layer times: through the probes; beyond them, the nearest segment's
        slope (proportional with a single point), never below 1% of the smallest probe."""
        s, m = self.sums, self.measured
        if len(s) == 1:
            return float(m[0] * sum_ms / s[0])
        if sum_ms <= s[0]:
            slope = (m[1] - m[0]) / (s[1] - s[0])
            return float(max(m[0] + slope * (sum_ms - s[0]), 0.01 * m[0]))
        if sum_ms >= s[-1]:
            slope = (m[-1] - m[-2]) / (s[-1] - s[-2])
            return float(m[-1] + slope * (sum_ms - s[-1]))
        return float(np.interp(sum_ms, s, m))

    def cost(self, kind: str, kept: np.ndarray) -> float:
        if kind == "latency":
            return self.latency_ns(kept)
        return self.base.cost(kind, kept)

    def dense(self, kind: str) -> float:
        return self.cost(kind, self.base.group_sizes)

    def predict_ms(self, kept: np.ndarray) -> float:
        return self.latency_ns(kept) / 1e6


def layer_groups(analysis) -> dict[str, tuple[int, int]]:
    """Per Conv2d / Linear of the analysed model: (index of the group controlling its input channels,
    index of the group controlling its output channels), -1 where fixed. Depthwise convs are listed
    as out-only by the analysis (their input follows their output); `measure_table` records them so."""
    out: dict[str, list[int]] = {}
    for j, g in enumerate(analysis.groups):
        for name in g.act_modules:
            out.setdefault(name, [-1, -1])[1] = j
        for name in g.in_modules:
            out.setdefault(name, [-1, -1])[0] = j
    return {k: (v[0], v[1]) for k, v in out.items()}


def latency_cost(analysis, table: LatencyTable) -> LatencyCost:
    """The planner's cost model for `table` on the model `analysis` describes; ValueError if they differ."""
    groups = layer_groups(analysis)
    sizes = analysis.cost.group_sizes
    layers = []
    for t in table.layers:
        gi, go = groups.get(t.name, (-1, -1))
        for what, gidx, axis in (("input", gi, t.cin), ("output", go, t.cout)):
            if gidx >= 0 and int(axis[-1]) != int(sizes[gidx]):
                raise ValueError(f"latency table layer {t.name!r}: {what} grid ends at {axis[-1]} channels, the "
                                 f"model's group {analysis.groups[gidx].name!r} has {int(sizes[gidx])}: the table "
                                 "was measured on another model")
        layers.append(_Layer(gi, go, np.asarray(t.cin, float), np.asarray(t.cout, float),
                             _monotone(np.asarray(t.us, float))))
    missing = sorted(set(groups) - {t.name for t in table.layers})
    if missing:
        raise ValueError(f"latency table has no timing for pruned layer(s) {missing[:5]}: measured on another model")
    return LatencyCost(analysis.cost, layers, table.calibration, table.probes)


def no_saving_groups(cost: LatencyCost, min_keep_counts: Mapping[str, int], min_saving: float = MIN_SAVING
                     ) -> frozenset[str]:
    """Groups whose pruning to `min_keep_counts[g]` (all else dense) saves < min_saving of the dense time."""
    dense = cost.latency_ns(cost.group_sizes)
    out = set()
    for j, g in enumerate(cost.group_names):
        kept = cost.group_sizes.astype(np.float64).copy()
        kept[j] = min_keep_counts[g]
        if dense - cost.latency_ns(kept) < min_saving * dense:
            out.add(g)
    return frozenset(out)


# ----------------------------------------------------------------------------------------------------
# Measuring (torch + onnx + onnxruntime)


def runtime_name() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} CPU"


def _session(model_bytes: bytes, threads: int):
    from cut.infer import cpu_session

    return cpu_session(model_bytes, threads, quiet=True)


def _time_session(session, feed: dict, runs: int, warmup: int) -> float:
    """Median microseconds of one run."""
    from cut.infer import time_runs

    return statistics.median(time_runs(session, feed, runs, warmup)) * 1e3


@dataclass(frozen=True)
class LayerSpec:
    """What a layer's probe needs: kind, channels, kernel geometry and its input's spatial size."""

    name: str
    kind: str  # conv | depthwise | linear
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    in_hw: tuple[int, ...] = ()  # conv: (H, W); linear: leading dims of its input beyond the batch
    bias: bool = False

    def key(self) -> tuple:
        return (self.kind, self.kernel, self.stride, self.padding, self.dilation, self.in_hw, self.bias)


def _probe_onnx(spec: LayerSpec, cin: int, cout: int, copies: int = 1) -> tuple[bytes, dict]:
    """An ONNX model running `copies` of `spec` at (cin, cout) channels side by side on one input (each its
    own output), and a random input feed for it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, attrs, nodes = [], {}, []
    groups = cout if spec.kind == "depthwise" else 1
    cin = cout if spec.kind == "depthwise" else cin
    shape = [1, *spec.in_hw, cin] if spec.kind == "linear" else [1, cin, *spec.in_hw]
    if spec.kind != "linear":
        attrs = dict(kernel_shape=list(spec.kernel), strides=list(spec.stride), dilations=list(spec.dilation),
                     pads=[spec.padding[0], spec.padding[1], spec.padding[0], spec.padding[1]], group=groups)
    for i in range(copies):
        # Each copy its own weights: copies sharing them are one computation to the runtime's common
        # subexpression elimination (which then ran 4 copies in the time of 1).
        if spec.kind == "linear":
            w = rng.standard_normal((cin, cout)).astype(np.float32) * 0.1
            nodes += [helper.make_node("MatMul", ["x", f"W{i}"], [f"m{i}"]),
                      helper.make_node("Add", [f"m{i}", f"B{i}"], [f"y{i}"])]
        else:
            w = rng.standard_normal((cout, cin // groups, *spec.kernel)).astype(np.float32) * 0.1
            # BatchNorm folds into the conv's bias and ReLU fuses into it when the whole model runs.
            nodes += [helper.make_node("Conv", ["x", f"W{i}", f"B{i}"], [f"c{i}"], **attrs),
                      helper.make_node("Relu", [f"c{i}"], [f"y{i}"])]
        inits += [numpy_helper.from_array(w, f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"B{i}")]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(copies)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), {"x": rng.standard_normal(shape).astype(np.float32)}


def layer_times(probes: Sequence[tuple[LayerSpec, int, int]], threads: int = 1, sweeps: int = SWEEPS,
                runs: int = LAYER_RUNS, warmup: int = LAYER_WARMUP, copies: int = PROBE_COPIES) -> list[float]:
    """Microseconds of one run of each (spec, cin, cout) alone on this machine's onnxruntime, less the
    runtime's per-call cost (`call_overhead_us`, which the whole model pays once).

    Each probe runs `copies` of the layer side by side (the per-call cost and its jitter, larger than a
    small layer's own time, are shared by the copies), and every probe is timed in `sweeps` interleaved
    sweeps, keeping its fastest median: timed once each, one after the other, a few seconds of drift
    showed as a larger layer running faster than a smaller one.
    """
    null_us = call_overhead_us(threads)
    out: list[float] = []
    for start in range(0, len(probes), PROBES_AT_ONCE):  # bounds the memory a large model's probes hold
        sessions = [(_session(data, threads), feed) for data, feed in
                    (_probe_onnx(spec, cin, cout, copies) for spec, cin, cout in probes[start:start + PROBES_AT_ONCE])]
        best = [math.inf] * len(sessions)
        for _ in range(sweeps):
            for i, (session, feed) in enumerate(sessions):
                best[i] = min(best[i], _time_session(session, feed, runs, warmup))
        out += [max((b - null_us) / copies, 0.01) for b in best]
    return out


def call_overhead_us(threads: int = 1, runs: int = 60) -> float:
    """Median microseconds of running a near-empty graph (one ReLU on one value): the per-call cost of
    the runtime that every alone-timed layer includes and the whole model pays only once."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "null",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feed = {"x": np.zeros((1, 1, 1, 1), np.float32)}
    return _time_session(_session(model.SerializeToString(), threads), feed, runs, 10)


def layer_specs(model) -> list[LayerSpec]:
    """Every Conv2d / Linear of `model` with its input's shape (one forward pass on zeros)."""
    from torch import nn

    from cut.groups import probe_layers

    shapes: dict[str, tuple[int, ...]] = {}
    probe_layers(model, lambda n, mod, inputs, output: shapes.__setitem__(n, tuple(inputs[0].shape)))
    specs = []
    for n, m in model.named_modules():
        if n not in shapes:
            continue
        if isinstance(m, nn.Linear):
            specs.append(LayerSpec(n, "linear", m.in_features, m.out_features, in_hw=shapes[n][1:-1],
                                   bias=m.bias is not None))
            continue
        if m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            raise ValueError(f"{n}: grouped convolutions are not timed (cut never prunes them)")
        if isinstance(m.padding, str):
            raise ValueError(f"{n}: string padding {m.padding!r} is not timed; use explicit padding")
        specs.append(LayerSpec(n, "depthwise" if m.groups > 1 else "conv", m.in_channels, m.out_channels,
                               tuple(m.kernel_size), tuple(m.stride), tuple(m.padding), tuple(m.dilation),
                               tuple(shapes[n][2:]), m.bias is not None))
    return specs


def measure_round_to(threads: int = 1, width: int = 64, hw: int = 8, sweeps: int = SWEEPS
                     ) -> tuple[int, dict[str, list[float]]]:
    """The channel multiple this runtime runs fastest, and the timings (us) it was chosen from.

    A 3x3 conv with `width` channels on the other side is timed at every input and at every output
    count from width/4 + 1 to width. A count c is *wasteful* if a larger count runs (within
    ROUND_TOLERANCE / 6) as fast on either axis: its extra channels would come for free. Each multiple m
    is scored by the fraction of its multiples in the range that are not wasteful; the smallest m
    within 0.1 of the best score wins (a finer multiple gives the planner more choices).

    Counts are timed by `layer_times` (interleaved sweeps): timed twice each, one after the other, a few
    seconds of drift made 56 channels look faster than 48 and the same machine chose 32 one run, 16 the next.
    """
    spec = LayerSpec("probe", "conv", width, width, (3, 3), (1, 1), (1, 1), (1, 1), (hw, hw))
    counts = list(range(width // 4 + 1, width + 1))
    probes = [(spec, width, c) for c in counts] + [(spec, c, width) for c in counts]
    times = layer_times(probes, threads, sweeps, runs=6, warmup=2)
    timings = {"cout": times[:len(counts)], "cin": times[len(counts):]}
    tol = 1 + ROUND_TOLERANCE / 6
    wasteful = set()
    for axis in ("cout", "cin"):
        t = timings[axis]
        for i, c in enumerate(counts):
            if any(t[k] <= t[i] * tol for k in range(i + 1, len(counts))):
                wasteful.add(c)
    scores = {}
    for m in ROUND_CANDIDATES:
        multiples = [c for c in counts if c % m == 0]
        if multiples:
            scores[m] = sum(c not in wasteful for c in multiples) / len(multiples)
    best = max(scores.values())
    chosen = min(m for m, v in scores.items() if v >= best - 0.1)
    return chosen, {"counts": [float(c) for c in counts], **timings,
                    "scores": [scores.get(m, 0.0) for m in ROUND_CANDIDATES]}


def grid_counts(size: int, round_to: int, points: int = MAX_GRID - 1) -> tuple[int, ...]:
    """Up to `points` channel counts from a small one to `size`: multiples of round_to, evenly spread."""
    step = max(1, round_to)
    candidates = sorted({c for c in range(step, size + 1, step)} | {size})
    lowest = min(candidates[0], max(1, size // 4))
    candidates = sorted(set(candidates) | {lowest})
    if len(candidates) <= points:
        return tuple(candidates)
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, points)).astype(int))
    return tuple(candidates[i] for i in picks)


def _uniform_counts(analysis, fraction: float, round_to: int) -> dict[str, int]:
    out = {}
    for g in analysis.groups:
        c = max(round_to, int(round(g.size * fraction / round_to)) * round_to)
        out[g.name] = min(g.size, c)
    return out


def interleaved_ms(onnx_paths: Sequence[str | Path | bytes], threads: int = 1, rounds: int = 6, runs: int = 8,
                   warmup: int = WHOLE_WARMUP) -> list[float]:
    """Median ms of one batch-1 run of each model, timed in interleaved rounds (a busy host's load drifts
    over seconds: interleaving spreads it over every model alike). rounds * runs >= 20 per model."""
    from cut.infer import cpu_session, time_runs

    sessions, feeds = [], []
    for path in onnx_paths:
        session = cpu_session(path, threads)
        spec = session.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in spec.shape]
        shape[0] = 1
        sessions.append(session)
        feeds.append({spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    for session, feed in zip(sessions, feeds, strict=True):
        time_runs(session, feed, 0, warmup)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (session, feed) in enumerate(zip(sessions, feeds, strict=True)):
            times[i] += time_runs(session, feed, runs, 0)
    return [statistics.median(t) for t in times]


def timed_fraction(dense_path: str | Path | bytes, plan_path: str | Path | bytes, threads: int = 1,
                   repeats: int = REPEATS, rounds: int = 12, runs: int = 10) -> tuple[float, float]:
    """(dense ms, plan ms) of a plan timed beside its dense model: of `repeats` interleaved timings, the one whose
    plan / dense fraction is the median. The checks act on that fraction at a 3% tolerance, and one timing of it
    moved by 1.1-1.5% (std), up to 4.4%, between timings on a 2-core host (benchmarks/bench_timing_noise.py)."""
    pairs = sorted((interleaved_ms([dense_path, plan_path], threads, rounds, runs) for _ in range(max(1, repeats))),
                   key=lambda pair: pair[1] / pair[0])
    dense_ms, plan_ms = pairs[len(pairs) // 2]
    return dense_ms, plan_ms


def models_ms(models: Sequence, threads: int = 1, rounds: int = 12, runs: int = 10) -> list[float]:
    """Export each MultiTaskModel to a temporary ONNX file and time them interleaved (`interleaved_ms`)."""
    from cut.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, model in enumerate(models):
            paths.append(Path(tmp) / f"probe{i}.onnx")
            export_onnx(model, paths[-1])
        return interleaved_ms(paths, threads, rounds, runs)


def measure_table(model, base_model_sha256: str = "", threads: int = 1, round_to: int | None = None,
                  progress: bool = False) -> LatencyTable:
    """Time `model` (a decomposed MultiTaskModel) on this machine's onnxruntime: see the module docstring."""
    from cut.compact import compact_model
    from cut.groups import analyse
    from cut.planner import plan_from_counts

    start = time.perf_counter()
    analysis = analyse(model)
    groups = layer_groups(analysis)
    sizes = analysis.sizes
    names = [g.name for g in analysis.groups]
    if round_to is None:
        round_to, _ = measure_round_to(threads)
    grids = []
    for spec in layer_specs(model):
        gi, go = groups.get(spec.name, (-1, -1))
        cins = grid_counts(sizes[names[gi]], round_to) if gi >= 0 and spec.kind != "depthwise" else (spec.cin,)
        couts = grid_counts(sizes[names[go]], round_to) if go >= 0 else (spec.cout,)
        grids.append((spec, cins, couts))
    probes = {(*spec.key(), ci, co): (spec, ci, co) for spec, cins, couts in grids for ci in cins for co in couts}
    measured = dict(zip(probes, layer_times(list(probes.values()), threads), strict=True))
    layers = [LayerTiming(spec.name, tuple(int(c) for c in cins), tuple(int(c) for c in couts),
                          tuple(tuple(round(measured[(*spec.key(), ci, co)], 3) for co in couts) for ci in cins))
              for spec, cins, couts in grids]
    if progress:
        print(f"latency table: {len(measured)} layer probes in {time.perf_counter() - start:.1f} s")
    partial = LatencyTable(base_model_sha256, tuple(model.task_names), tuple(model.config.input_size), runtime_name(),
                           threads, round_to, ((1.0, 1.0),), 1.0, tuple(layers))
    cost = latency_cost(analysis, partial)
    sums, models = [], []
    for fraction in PROBE_FRACTIONS:
        counts = _uniform_counts(analysis, fraction, round_to)
        sums.append(cost.predict_ms(cost.counts_vector(counts)))
        if fraction < 1.0:
            plan = plan_from_counts({g: np.zeros(sizes[g]) for g in names}, counts, analysis, "params", 1.0)
            models.append(compact_model(model, plan))
        else:
            models.append(model)
    times = models_ms(models, threads)
    points = sorted({round(s, 6): (round(s, 6), round(t, 6), f) for s, t, f in zip(sums, times, PROBE_FRACTIONS,
                                                                                     strict=True)}.values())
    return LatencyTable(
        base_model_sha256=base_model_sha256, tasks=tuple(model.task_names), input_size=tuple(model.config.input_size),
        runtime=runtime_name(), threads=threads, round_to=round_to,
        calibration=tuple((s, t) for s, t, _ in points), dense_ms=round(times[0], 6), layers=tuple(layers),
        probes=tuple(float(f) for _, _, f in points),
        seconds=round(time.perf_counter() - start, 3),
    )


CHECK_TOLERANCE = 0.03  # `check_plan`: a plan measured within 3% of the asked fraction (or below it) is kept
MAX_CHECKS = 3  # plans timed by `check_plan` at most (each adds its point to the calibration)


def with_measured_point(table: LatencyTable, sum_ms: float, measured_ms: float) -> LatencyTable:
    """`table` with (layer-time sum, measured whole-model ms) of a timed plan among its calibration points.

    The uniform probes calibrate the table where uniform models land; a plan thins some groups far more than
    others, and its measured time says how far plans land from the probes: the cost model scales the probes'
    curve by it (`_corrected`). A measured plan at (within 1e-6 ms) the sum of an existing point replaces it,
    except the largest probe, the dense model (a plan that keeps everything is the dense model: nothing is
    added); beyond MAX_CALIBRATION points the measured plan nearest in sum is dropped."""
    probes = list(table.probes) if len(table.probes) == len(table.calibration) else [0.0] * len(table.calibration)
    points = [(round(float(a), 6), float(b), f) for (a, b), f in zip(table.calibration, probes, strict=True)]
    anchor = max(a for a, _, f in points if f != MEASURED_PLAN)
    if sum_ms >= anchor - 1e-6:
        return table
    points = [p for p in points if abs(p[0] - sum_ms) > 1e-6]
    if len(points) >= MAX_CALIBRATION:
        measured = [p for p in points if p[2] == MEASURED_PLAN]
        if not measured:
            raise ValueError("latency table calibration is full of probes: no room for a measured plan")
        points.remove(min(measured, key=lambda p: abs(p[0] - sum_ms)))
    points = sorted([*points, (round(float(sum_ms), 6), round(float(measured_ms), 6), MEASURED_PLAN)])
    return dataclasses.replace(table, calibration=tuple((a, b) for a, b, _ in points),
                               probes=tuple(f for _, _, f in points))


def with_measured_plan(table: LatencyTable, analysis, plan, measured_fraction: float) -> LatencyTable:
    """`table` with `plan`'s measured time (a fraction of the dense model's, both timed together) among its
    calibration points: the plan's layer-time sum against that fraction of the table's own dense prediction,
    so a machine that drifted since the table was measured does not shift the whole calibration."""
    cost = latency_cost(analysis, table)
    kept = cost.counts_vector({g: len(k) for g, k in plan.keep.items()})
    return with_measured_point(table, cost.layer_sum_ms(kept), measured_fraction * cost.predict_ms(cost.group_sizes))


@dataclass
class PlanCheck:
    """One plan timed whole beside the dense model by `check_plan`."""

    predicted_fraction: float  # of the dense time, by the table the plan was made with
    measured_fraction: float  # of the dense time, both timed now, interleaved
    dense_ms: float  # the dense model's time in that timing


def check_plan(model, table: LatencyTable, plan_for, asked_fraction: float, threads: int = 1,
               tolerance: float = CHECK_TOLERANCE, max_checks: int = MAX_CHECKS, rounds: int = 12, runs: int = 10):
    """Plan against `table`, time the plan's compact model beside `model` (the dense decomposed model) on this
    machine, and while it measures above `asked_fraction` * (1 + tolerance) or below `asked_fraction` *
    (1 - tolerance), add the measurement to the table's calibration (`with_measured_point`) and plan again.

    `plan_for(table)` returns the PruningPlan a table gives (the caller's scores and budget). Returns
    (table, plan, checks): the plan measured closest to the asked fraction without exceeding it by more than
    the tolerance (if none did, the fastest), the table it was made with (so planning again with that table
    gives the same plan) and every check (each measurement enters the calibration by `with_measured_plan`)."""
    from cut.compact import compact_model
    from cut.export import export_onnx
    from cut.groups import analyse

    analysis = analyse(model)
    tried = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        export_onnx(model, dense_path)
        for i in range(max(1, int(max_checks))):
            plan = plan_for(table)
            cost = latency_cost(analysis, table)
            kept = cost.counts_vector({g: len(k) for g, k in plan.keep.items()})
            path = Path(tmp) / f"plan{i}.onnx"
            export_onnx(compact_model(model, plan).eval(), path)
            dense_ms, plan_ms = timed_fraction(dense_path, path, threads, rounds=rounds, runs=runs)
            check = PlanCheck(cost.predict_ms(kept) / cost.predict_ms(cost.group_sizes), plan_ms / dense_ms, dense_ms)
            tried.append((table, plan, check))
            if abs(check.measured_fraction / asked_fraction - 1) <= tolerance:
                break
            table = with_measured_plan(table, analysis, plan, check.measured_fraction)
    within = [t for t in tried if t[2].measured_fraction <= asked_fraction * (1 + tolerance)]
    chosen = (max(within, key=lambda t: t[2].measured_fraction) if within
              else min(tried, key=lambda t: t[2].measured_fraction))
    return chosen[0], chosen[1], [t[2] for t in tried]


# ----------------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    root = os.environ.get("CUTFL_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / ("" if os.environ.get("CUTFL_CACHE") else "cut-fl") / "latency"


def cache_key(model, base_model_sha256: str, threads: int) -> str:
    """Base model, tasks, input size, layer shapes, runtime and threads: what the table depends on."""
    from cut.export import GRAPH_REVISION  # the whole-model probes are exported graphs: a new graph, a new table

    shapes = [(s.name, s.kind, s.cin, s.cout, s.key()) for s in layer_specs(model)]
    blob = json.dumps([base_model_sha256, list(model.task_names), list(model.config.input_size), runtime_name(),
                       threads, repr(shapes), GRAPH_REVISION])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def table_for(model, base_model_sha256: str = "", threads: int = 1, cache_dir: str | Path | None = None,
              refresh: bool = False, progress: bool = False) -> LatencyTable:
    """The cached table of `model` on this machine, measured (and cached) if missing or `refresh`."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{cache_key(model, base_model_sha256, threads)}.json"
    if path.is_file() and not refresh:
        try:
            return LatencyTable.from_dict(json.loads(path.read_text()))
        except (ValueError, json.JSONDecodeError):
            pass  # a stale or damaged cache entry is measured again
    table = measure_table(model, base_model_sha256, threads, progress=progress)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(table.to_json())
    os.replace(tmp, path)
    return table


__all__ = [
    "LatencyCost",
    "LatencyTable",
    "LayerSpec",
    "LayerTiming",
    "MIN_SAVING",
    "TABLE_FORMAT",
    "cache_key",
    "grid_counts",
    "latency_cost",
    "layer_groups",
    "layer_specs",
    "layer_times",
    "measure_round_to",
    "measure_table",
    "no_saving_groups",
    "table_for",
]
