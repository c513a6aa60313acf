"""Flower records <-> the wire bytes of cut.wire and plain numpy dicts: the one Flower-facing codec.

Both apps use it, so the message types, the record names and the way arrays travel are defined once. cut/wire.py stays Flower-free: it speaks protobuf bytes and `dict[str, np.ndarray]`; this
module only puts those into `ConfigRecord` / `ArrayRecord` / `MetricRecord` and takes them out again,
turning every malformed record into a `ValidationError` with a reason (never a KeyError deep inside).
Arrays are read with numpy's loader without pickles (Flower's `Array.numpy` uses allow_pickle=False),
and only after their npy header was checked against the bytes actually there: a header may not claim
more data than it carries (numpy would allocate the claimed size first), nor the record more arrays or
bytes than its `Limits` allow.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from cut.messages import DEFAULT_LIMITS, Limits, ValidationError, check_name, check_sha256
from cut.models import ModelConfig, MultiTaskModel, build_model

# Message types (Flower 1.41: `<category>.<action>`).
PROFILE = "query.profile"
SCORE = "query.score"
DELIVER = "train.deliver"
FINETUNE = "train.finetune"
EVALUATE = "evaluate"

# Record names inside a message's RecordDict.
PROFILE_REC = "profile"  # device -> server: {"data": TaskProfile bytes}
REQUEST = "request"  # server -> device: {"data": ScoringRequest bytes, model transport fields}
BASE = "base"  # server -> device (arrays transport): the decomposed base weights
REPORT = "report"  # device -> server: {"header": ImportanceReport bytes}
SCORES = "scores"  # device -> server: score vectors keyed "<task>/<group>"
SPEC = "spec"  # server -> device: {"data": CompactModelSpec bytes}
WEIGHTS = "weights"  # compact model weights, either way
CONFIG = "config"  # server -> device: the typed settings of a phase (protocol.phases)
METRICS = "metrics"  # device -> server: numbers


def config_of(content: RecordDict, name: str) -> ConfigRecord:
    """The ConfigRecord `name` of a message, or a ValidationError saying it is missing."""
    record = content.config_records.get(name)
    if record is None:
        raise ValidationError(f"message: missing config record {name!r}")
    return record


def field(record: ConfigRecord, key: str, kind: type, where: str = "message", limits: Limits = DEFAULT_LIMITS):
    """One typed value of a ConfigRecord (bytes, str, int, float or bool), checked; bytes and str values
    are bounded by `limits.max_header_bytes` (the largest serialised message a field may carry)."""
    if key not in record:
        raise ValidationError(f"{where}: missing field {key!r}")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValidationError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, (str, bytes)) and len(value) > limits.max_header_bytes:
        raise ValidationError(f"{where}: field {key!r} is {len(value)} long (max {limits.max_header_bytes})")
    return value


def optional_field(record: ConfigRecord, key: str, kind: type, default, where: str = "message"):
    return field(record, key, kind, where) if key in record else default


def sha256_field(record: ConfigRecord, key: str, where: str = "message") -> str:
    """A str field that must be a sha256 (64 lowercase hex characters)."""
    value = field(record, key, str, where)
    check_sha256(where, f"field {key!r}", value)
    return value


# ------------------------------------------------------------------------------------------ arrays


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (names kept, so '<task>/<group>' keys travel as they are)."""
    return ArrayRecord({name: Array(np.require(value, requirements="C")) for name, value in arrays.items()})


def _check_record(record: Any, kind: type, where: str, noun: str, most: int) -> None:
    """A record of `kind` holding at most `most` entries, or a ValidationError naming what is wrong."""
    if record is None:
        raise ValidationError(f"{where}: missing {noun} record")
    if not isinstance(record, kind):
        raise ValidationError(f"{where}: expected a{'n' if noun == 'array' else ''} {kind.__name__}, "
                              f"got {type(record).__name__}")
    if len(record) > most:
        raise ValidationError(f"{where}: {len(record)} {noun}s (max {most})")


def record_arrays(record: ArrayRecord | None, where: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """ArrayRecord -> named numpy arrays, bounded in count and bytes; anything odd is a ValidationError.

    `limits.max_array_bytes` bounds the arrays' data (as their npy headers declare it, checked against the
    bytes present) before any is parsed; pass limits tightened to what is expected (cut.wire.report_limits,
    cut.wire.arrays_limits) to refuse an oversized upload before reading it."""
    _check_record(record, ArrayRecord, where, "array", limits.max_arrays)
    total = 0
    for name, array in record.items():
        if not isinstance(name, str) or not name or len(name) > 2 * limits.max_name_len:
            raise ValidationError(f"{where}: bad array name {name!r:.80}")
        total += _npy_nbytes(array, f"{where}: array {name!r}")
        if total > limits.max_array_bytes:
            raise ValidationError(f"{where}: arrays exceed {limits.max_array_bytes} bytes (too large)")
    out: dict[str, np.ndarray] = {}
    for name, array in record.items():
        try:
            value = array.numpy()
        except Exception as e:  # noqa: BLE001 - whatever numpy makes of the sender's bytes is the sender's fault
            raise ValidationError(f"{where}: array {name!r} cannot be read ({_why(e)})") from None
        out[name] = value
    return out


_NPY = "numpy.ndarray"  # Flower's SType.NUMPY


def _npy_nbytes(array: Any, where: str) -> int:
    """The data bytes an Array's npy header declares, which must be exactly the bytes that follow it (numpy
    allocates what the header claims before reading, so a 100-byte message could ask for terabytes)."""
    if not isinstance(array, Array) or array.stype != _NPY or not isinstance(array.data, bytes):
        raise ValidationError(f"{where} is not a numpy array (stype {getattr(array, 'stype', None)!r:.40})")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy format version {version} is not supported")
    except Exception as e:  # noqa: BLE001 - a malformed header, whatever numpy raises
        raise ValidationError(f"{where} has no valid npy header ({_why(e)})") from None
    if dtype.hasobject:
        raise ValidationError(f"{where} has an object dtype")
    declared = math.prod(shape) * dtype.itemsize
    present = len(array.data) - stream.tell()
    if declared != present:
        raise ValidationError(f"{where}: its header declares {dtype}{list(shape)} = {declared} bytes, "
                              f"the message holds {present}")
    return declared


def state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A model's state dict as numpy arrays (the form weights travel and are hashed in)."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}


def arrays_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------- metrics


def metrics_record(prefix: str, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{task: {metric: value}} -> flat {"<prefix>/<task>/<metric>": value} for a MetricRecord."""
    return {f"{prefix}/{task}/{name}": float(value) for task, per in metrics.items() for name, value in per.items()}


def read_metrics(record: MetricRecord | None, prefix: str, where: str = "metrics",
                 limits: Limits = DEFAULT_LIMITS) -> dict[str, dict[str, float]]:
    """Flat metric keys under `prefix` -> {task: {metric: value}}; values must be real numbers (NaN and inf
    are kept: a metric over no valid pixel is NaN, and the report writes it as null). At most
    `limits.max_metrics` entries; task and metric names are printable names of bounded length."""
    _check_record(record, MetricRecord, where, "metric", limits.max_metrics)
    out: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        head, _, rest = key.partition("/")
        if head != prefix:
            continue
        task, _, name = rest.partition("/")
        if not task or not name:
            raise ValidationError(f"{where}: bad metric key {key!r:.80}")
        check_name(where, "metric task", task, limits)
        check_name(where, "metric name", name, limits)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValidationError(f"{where}: metric {key!r:.80} is not a number")
        out.setdefault(task, {})[name] = float(value)
    return out


def metric_value(record: MetricRecord | None, key: str, where: str = "metrics", minimum: float | None = 0.0) -> float:
    """One finite number of a MetricRecord; by default a size or count, so >= `minimum` (0)."""
    if record is None or key not in record:
        raise ValidationError(f"{where}: missing metric {key!r}")
    value = record[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValidationError(f"{where}: metric {key!r} must be a finite number, got {value!r:.40}")
    if minimum is not None and value < minimum:
        raise ValidationError(f"{where}: metric {key!r} is {value!r}, below {minimum:g}")
    return float(value)


# ------------------------------------------------------------------------------------ architectures


def build_architecture(architecture: Any, where: str, limits: Limits = DEFAULT_LIMITS) -> MultiTaskModel:
    """An architecture config from a message (a dict, or its JSON text) -> the untrained model it describes.

    Anything that does not parse or build is a ValidationError; so is a model larger than the weight
    arrays that could be sent for it (`limits.max_array_bytes` of float32), which is measured on torch's
    meta device first, without allocating it."""
    if isinstance(architecture, (str, bytes)):
        if len(architecture) > limits.max_header_bytes:
            raise ValidationError(f"{where}: architecture is {len(architecture)} long (max {limits.max_header_bytes})")
        try:
            architecture = json.loads(architecture)
        except (ValueError, RecursionError) as e:
            raise ValidationError(f"{where}: architecture is not valid JSON ({e})") from None
    if not isinstance(architecture, Mapping):
        raise ValidationError(f"{where}: architecture must be a JSON object, got {type(architecture).__name__}")
    try:
        config = ModelConfig.from_dict(dict(architecture))
        if len(config.tasks) > limits.max_tasks or len(config.head_dilations) > 16:
            raise ValueError(f"{len(config.tasks)} tasks and {len(config.head_dilations)} head dilations")
        with torch.device("meta"):
            probe = build_model(config)
        elements = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    except Exception as e:  # noqa: BLE001 - any way a config fails to build is the config's fault
        raise ValidationError(f"{where}: bad architecture ({_why(e)})") from None
    if elements * 4 > limits.max_array_bytes:
        raise ValidationError(f"{where}: architecture has {elements} parameters, more than "
                              f"{limits.max_array_bytes} bytes of weights could carry")
    try:
        return build_model(config)
    except Exception as e:  # noqa: BLE001
        raise ValidationError(f"{where}: architecture cannot be built ({_why(e)})") from None


def _why(e: BaseException) -> str:
    """An exception as one short line for a rejection reason (reasons go into logs and report tables)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


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
    "build_architecture",
    "config_of",
    "content_nbytes",
    "field",
    "metric_value",
    "metrics_record",
    "optional_field",
    "read_metrics",
    "record_arrays",
    "sha256_field",
    "state_arrays",
]
