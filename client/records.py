"""Flower records <-> the wire bytes of cut.wire and plain numpy dicts: the one Flower-facing codec.

Both sides use it (the server imports it from here), so the record names and the way arrays travel are
defined once. cut/wire.py stays Flower-free: it speaks protobuf bytes and `dict[str, np.ndarray]`; this
module only puts those into `ConfigRecord` / `ArrayRecord` / `MetricRecord` and takes them out again,
turning every malformed record into a `ValidationError` with a reason (never a KeyError deep inside).
Arrays are read with numpy's loader without pickles (Flower's `Array.numpy` uses allow_pickle=False).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from cut.messages import DEFAULT_LIMITS, Limits, ValidationError

# Message types (Flower 1.41: `<category>.<action>`).
PROFILE = "query.profile"
SCORE = "query.score"
DELIVER = "train.deliver"
FINETUNE = "train.finetune"
EVALUATE = "evaluate"

# Record names inside a message's RecordDict.
FLEET = "fleet"  # server -> device (simulation): the scenario's fleet description, JSON
PROFILE_REC = "profile"  # device -> server: {"data": TaskProfile bytes}
REQUEST = "request"  # server -> device: {"data": ScoringRequest bytes, model transport fields}
BASE = "base"  # server -> device (arrays transport): the decomposed base weights
REPORT = "report"  # device -> server: {"header": ImportanceReport bytes}
SCORES = "scores"  # device -> server: score vectors keyed "<task>/<group>"
SPEC = "spec"  # server -> device: {"data": CompactModelSpec bytes}
WEIGHTS = "weights"  # compact model weights, either way
CONFIG = "config"  # server -> device: plain settings of a phase
METRICS = "metrics"  # device -> server: numbers


def config_of(content: RecordDict, name: str) -> ConfigRecord:
    """The ConfigRecord `name` of a message, or a ValidationError saying it is missing."""
    record = content.config_records.get(name)
    if record is None:
        raise ValidationError(f"message: missing config record {name!r}")
    return record


def field(record: ConfigRecord, key: str, kind: type, where: str = "message"):
    """One typed value of a ConfigRecord (bytes, str, int, float or bool), checked."""
    if key not in record:
        raise ValidationError(f"{where}: missing field {key!r}")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValidationError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def optional_field(record: ConfigRecord, key: str, kind: type, default, where: str = "message"):
    return field(record, key, kind, where) if key in record else default


# ------------------------------------------------------------------------------------------ arrays


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (names kept, so '<task>/<group>' keys travel as they are)."""
    return ArrayRecord({name: Array(np.require(value, requirements="C")) for name, value in arrays.items()})


def record_arrays(record: ArrayRecord | None, where: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """ArrayRecord -> named numpy arrays, bounded in count and bytes; anything odd is a ValidationError."""
    if record is None:
        raise ValidationError(f"{where}: missing array record")
    if len(record) > limits.max_tasks * limits.max_groups:
        raise ValidationError(f"{where}: {len(record)} arrays (too many)")
    out: dict[str, np.ndarray] = {}
    total = 0
    for name, array in record.items():
        if not isinstance(name, str) or not name or len(name) > 2 * limits.max_name_len:
            raise ValidationError(f"{where}: bad array name {name!r:.80}")
        total += len(array.data)
        if total > limits.max_array_bytes:
            raise ValidationError(f"{where}: arrays exceed {limits.max_array_bytes} bytes")
        try:
            value = array.numpy()
        except (TypeError, ValueError, EOFError, OSError) as e:
            raise ValidationError(f"{where}: array {name!r} cannot be read ({type(e).__name__}: {e})") from None
        if value.dtype.hasobject:
            raise ValidationError(f"{where}: array {name!r} has an object dtype")
        out[name] = value
    return out


def state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A model's state dict as numpy arrays (the form weights travel and are hashed in)."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}


def arrays_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------- metrics


def metrics_record(prefix: str, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{task: {metric: value}} -> flat {"<prefix>/<task>/<metric>": value} for a MetricRecord."""
    return {f"{prefix}/{task}/{name}": float(value) for task, per in metrics.items() for name, value in per.items()}


def read_metrics(record: MetricRecord | None, prefix: str, where: str = "metrics") -> dict[str, dict[str, float]]:
    """Flat metric keys under `prefix` -> {task: {metric: value}}; values must be real numbers."""
    if record is None:
        raise ValidationError(f"{where}: missing metric record")
    out: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        head, _, rest = key.partition("/")
        if head != prefix:
            continue
        task, _, name = rest.partition("/")
        if not task or not name:
            raise ValidationError(f"{where}: bad metric key {key!r:.80}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValidationError(f"{where}: metric {key!r:.80} is not a number")
        out.setdefault(task, {})[name] = float(value)
    return out


def metric_value(record: MetricRecord | None, key: str, where: str = "metrics") -> float:
    if record is None or key not in record:
        raise ValidationError(f"{where}: missing metric {key!r}")
    value = record[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValidationError(f"{where}: metric {key!r} must be a finite number, got {value!r:.40}")
    return float(value)


# ------------------------------------------------------------------------------------------- bytes


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: what its records hold (arrays with their npy headers, config values
    and keys, metrics); Flower's own framing is left out."""
    total = 0
    for record in content.values():
        total += int(record.count_bytes())
    return total


__all__ = [
    "ArrayRecord",
    "ConfigRecord",
    "MetricRecord",
    "RecordDict",
    "arrays_record",
    "arrays_state",
    "config_of",
    "content_nbytes",
    "field",
    "metric_value",
    "metrics_record",
    "optional_field",
    "read_metrics",
    "record_arrays",
    "state_arrays",
]
