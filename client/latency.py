"""A device's latency budget: the table it measures on its own runtime, sent inside its profile's Budget.

The server's profile query carries the base model's architecture and sha256 (protocol.phases.ProfileConfig).
Time depends on shapes, not on weight values, so the device builds the decomposed architecture with
untrained weights and times it (cut.latency: a few seconds, cached per base model, tasks, runtime and
threads in the device's store, or in the default cache without a store). The server then plans against
that table (server.planning.PlanBook.latency_budget). When the compact model arrives, the device times it
beside its dense decomposed model (`delivered_latency`) and reports both in its deliver reply: what the
budget bought on the device itself, not the table's prediction.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from cut.export import export_onnx
from cut.latency import table_for, timed_fraction
from cut.messages import Budget, ValidationError
from protocol.phases import ProfileConfig
from protocol.records import build_architecture


def measured_budget(budget: Budget, tasks: tuple[str, ...], config: ProfileConfig, threads: int = 1,
                    store_root: str = "") -> Budget:
    """`budget` with the latency table of the decomposed base model measured here (unchanged if not latency)."""
    if budget.kind != "latency":
        return budget
    if not config.architecture or not config.base_model_sha256:
        raise ValidationError("profile query: a latency budget needs the base model's architecture and sha256 "
                              "(the server sent none)")
    model = build_architecture(config.architecture, "profile query").decompose(list(tasks)).eval()
    cache = Path(store_root) / "latency" if store_root else None
    table = table_for(model, config.base_model_sha256, threads=threads, cache_dir=cache)
    return replace(budget, latency_table=table)


def delivered_latency(model, dense, threads: int = 1) -> dict[str, float]:
    """The delivered compact model and the dense decomposed one timed here, interleaved (onnxruntime, batch 1;
    the median of `cut.latency.REPEATS` timings, `timed_fraction`): {'latency_ms', 'latency_dense_ms'}, the
    deliver reply's metrics of a latency budget."""
    with tempfile.TemporaryDirectory() as tmp:
        dense_path, compact_path = Path(tmp) / "dense.onnx", Path(tmp) / "compact.onnx"
        export_onnx(dense.eval(), dense_path)
        export_onnx(model.eval(), compact_path)
        dense_ms, compact_ms = timed_fraction(dense_path, compact_path, threads)
    return {"latency_ms": float(compact_ms), "latency_dense_ms": float(dense_ms)}


__all__ = ["delivered_latency", "measured_budget"]
