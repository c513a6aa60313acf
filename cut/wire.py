"""The one place that converts cut's message dataclasses to and from protobuf bytes and named arrays.

Long (about 550 lines) on purpose: every message's encoder, decoder and limits sit together, so the
contract is checked in one file.

Everything else in cut/, server/ and client/ works with cut.messages and cut.plan dataclasses. Large
numeric payloads never go inside protobuf: score vectors travel as a dict of numpy arrays keyed
"<task>/<group name>" (server/client code wraps it in a Flower ArrayRecord; this module never imports
flwr). Encoders validate before sending, so a device cannot emit what the server would reject;
decoders bound sizes before parsing and turn every failure into a ValidationError with a reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import numpy as np

from cut.messages import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    SCORE_DTYPES,
    Budget,
    CompactModelSpec,
    ImportanceReport,
    Limits,
    PrivacySettings,
    ScoringRequest,
    TaskProfile,
    ValidationError,
    architecture_json,
    check_name,
    check_protocol_version,
    check_tasks,
    fail,
    validate_plan,
)
from cut.plan import PLAN_FORMAT_VERSION, PruningPlan
from cut.proto import cutfl_pb2 as pb

__all__ = [
    "PROTOCOL_VERSION",
    "ValidationError",
    "arrays_limits",
    "arrays_sha256",
    "check_arrays",
    "decode_plan",
    "declared_device_id",
    "decode_profile",
    "decode_report",
    "decode_request",
    "decode_spec",
    "encode_plan",
    "encode_profile",
    "encode_report",
    "encode_request",
    "encode_spec",
    "payload_nbytes",
    "report_key",
    "report_limits",
    "verify_weights",
]

_BUDGET_TO_PB = {"params": pb.Budget.PARAMS, "macs": pb.Budget.MACS, "latency": pb.Budget.LATENCY,
                 "memory": pb.Budget.MEMORY}
_BUDGET_FROM_PB = {v: k for k, v in _BUDGET_TO_PB.items()}
_DTYPE_TO_PB = {"float16": pb.ImportanceReport.FLOAT16, "float32": pb.ImportanceReport.FLOAT32}
_DTYPE_FROM_PB = {v: k for k, v in _DTYPE_TO_PB.items()}

M = TypeVar("M")


# ------------------------------------------------------------------------------------ plumbing


def _parse(cls: Callable[[], M], data: Any, where: str, limits: Limits) -> M:
    """Bytes -> protobuf message, bounded first; any parser error is the sender's fault."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        fail(where, f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_header_bytes:
        fail(where, f"message is {len(data)} bytes (max {limits.max_header_bytes})")
    msg = cls()
    try:
        msg.ParseFromString(data)  # type: ignore[attr-defined]
    except Exception as e:  # DecodeError, invalid UTF-8, nesting too deep: all mean garbage
        fail(where, f"not a valid {where} protobuf message ({type(e).__name__}: {e})")
    check_protocol_version(where, msg.protocol_version)  # type: ignore[attr-defined]
    return msg


def _serialize(msg: Any, where: str, limits: Limits) -> bytes:
    """Deterministic bytes (stable map order), so equal messages give equal bytes."""
    data = msg.SerializeToString(deterministic=True)
    if len(data) > limits.max_header_bytes:
        fail(where, f"message is {len(data)} bytes (max {limits.max_header_bytes})")
    return data


def _build(where: str, fill: Callable[[], Any]) -> Any:
    """Run a dataclass -> protobuf filler; a value protobuf refuses becomes a ValidationError."""
    try:
        return fill()
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ValidationError):
            raise
        fail(where, f"cannot encode ({type(e).__name__}: {e})")


def _budget_kind(where: str, kind: int) -> str:
    if kind not in _BUDGET_FROM_PB:
        fail(where, f"unknown budget kind {kind} on the wire")
    return _BUDGET_FROM_PB[kind]


# ------------------------------------------------------------------------------- TaskProfile


def _encode_budget(budget: Budget) -> pb.Budget:
    msg = pb.Budget(kind=_BUDGET_TO_PB[budget.kind], value=float(budget.value),
                    milliseconds=float(budget.milliseconds), memory_bytes=float(budget.memory_bytes))
    table = budget.latency_table
    if table is not None:
        msg.latency_table.CopyFrom(pb.LatencyTable(
            format=table.format, base_model_sha256=table.base_model_sha256, tasks=list(table.tasks),
            input_size=list(table.input_size), runtime=table.runtime, threads=table.threads,
            round_to=table.round_to, dense_ms=float(table.dense_ms),
            calibration=[pb.LatencyPoint(sum_ms=float(a), measured_ms=float(b)) for a, b in table.calibration],
            layers=[pb.LatencyLayer(name=t.name, cin=list(t.cin), cout=list(t.cout),
                                    us=[float(u) for row in t.us for u in row]) for t in table.layers],
        ))
    return msg


def _decode_budget(where: str, msg: pb.Budget) -> Budget:
    kind = _budget_kind(where, msg.kind)
    table = None
    if msg.HasField("latency_table"):
        table = _decode_latency_table(f"{where}.latency_table", msg.latency_table)
    return Budget(kind=kind, value=msg.value, milliseconds=msg.milliseconds, latency_table=table,
                  memory_bytes=msg.memory_bytes)


def _decode_latency_table(where: str, msg: pb.LatencyTable):
    """pb.LatencyTable -> cut.latency.LatencyTable; its own checks (bounds, grids, values) run on construction."""
    from cut.latency import MAX_LAYERS, LatencyTable, LayerTiming

    if len(msg.layers) > MAX_LAYERS:
        fail(where, f"{len(msg.layers)} layers (max {MAX_LAYERS})")
    layers = []
    for layer in msg.layers:
        cin, cout, us = list(layer.cin), list(layer.cout), list(layer.us)
        if len(us) != len(cin) * len(cout):
            fail(where, f"layer {layer.name[:80]!r}: {len(us)} times for a {len(cin)} x {len(cout)} grid")
        rows = tuple(tuple(us[i * len(cout):(i + 1) * len(cout)]) for i in range(len(cin)))
        layers.append(LayerTiming(layer.name, tuple(cin), tuple(cout), rows))
    try:
        return LatencyTable(
            base_model_sha256=msg.base_model_sha256, tasks=tuple(msg.tasks), input_size=tuple(msg.input_size),
            runtime=msg.runtime, threads=msg.threads, round_to=msg.round_to,
            calibration=tuple((p.sum_ms, p.measured_ms) for p in msg.calibration), dense_ms=msg.dense_ms,
            layers=tuple(layers), format=msg.format,
        )
    except ValueError as e:
        fail(where, str(e))


def encode_profile(profile: TaskProfile, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """TaskProfile -> protobuf bytes (validated first)."""
    profile.validate(limits=limits)

    def fill() -> pb.TaskProfile:
        msg = pb.TaskProfile(
            protocol_version=profile.protocol_version,
            device_id=profile.device_id,
            tasks=list(profile.tasks),
            budget=_encode_budget(profile.budget),
            device_class=profile.device_class,
        )
        msg.task_priority.update({k: float(v) for k, v in profile.task_priority.items()})
        msg.samples_per_task.update({k: int(v) for k, v in profile.samples_per_task.items()})
        return msg

    return _serialize(_build("TaskProfile", fill), "TaskProfile", limits)


def declared_device_id(data: bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    """The device id a TaskProfile claims, for the log and report of a profile that was refused ('' if even
    that cannot be read); printable characters only, at most limits.max_name_len of them."""
    try:
        msg = _parse(pb.TaskProfile, data, "TaskProfile", limits)
    except ValidationError:
        return ""
    return "".join(c for c in msg.device_id if c.isprintable())[:limits.max_name_len]


def decode_profile(
    data: bytes, *, known_tasks: Collection[str] | None = None, limits: Limits = DEFAULT_LIMITS
) -> TaskProfile:
    """Protobuf bytes -> validated TaskProfile."""
    where = "TaskProfile"
    msg = _parse(pb.TaskProfile, data, where, limits)
    if not msg.HasField("budget"):
        fail(where, "missing budget")
    profile = TaskProfile(
        device_id=msg.device_id,
        tasks=tuple(msg.tasks),
        budget=_decode_budget(f"{where}.budget", msg.budget),
        device_class=msg.device_class,
        task_priority=dict(msg.task_priority),
        samples_per_task=dict(msg.samples_per_task),
        protocol_version=msg.protocol_version,
    )
    profile.validate(known_tasks, limits)
    return profile


# ---------------------------------------------------------------------------- ScoringRequest


def encode_request(request: ScoringRequest, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """ScoringRequest -> protobuf bytes (validated first)."""
    request.validate(limits=limits)

    def fill() -> pb.ScoringRequest:
        p = request.privacy
        privacy = pb.PrivacySettings(clip_norm=float(p.clip_norm), noise_multiplier=float(p.noise_multiplier))
        return pb.ScoringRequest(
            protocol_version=request.protocol_version,
            base_model_id=request.base_model_id,
            base_model_sha256=request.base_model_sha256,
            tasks=list(request.tasks),
            criterion=request.criterion,
            num_batches=int(request.num_batches),
            batch_size=int(request.batch_size),
            privacy=privacy,
        )

    return _serialize(_build("ScoringRequest", fill), "ScoringRequest", limits)


def decode_request(
    data: bytes,
    *,
    known_tasks: Collection[str] | None = None,
    base_model_sha256: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ScoringRequest:
    """Protobuf bytes -> validated ScoringRequest (a missing privacy block means no DP)."""
    msg = _parse(pb.ScoringRequest, data, "ScoringRequest", limits)
    p = msg.privacy
    request = ScoringRequest(
        base_model_id=msg.base_model_id,
        base_model_sha256=msg.base_model_sha256,
        tasks=tuple(msg.tasks),
        criterion=msg.criterion,
        num_batches=msg.num_batches,
        batch_size=msg.batch_size,
        privacy=PrivacySettings(clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier),
        protocol_version=msg.protocol_version,
    )
    request.validate(known_tasks, base_model_sha256, limits)
    return request


# -------------------------------------------------------------------------- ImportanceReport


def report_key(task: str, group: str) -> str:
    """Array key of one score vector; task names are identifiers, so the first '/' splits it."""
    return f"{task}/{group}"


def encode_report(
    report: ImportanceReport, dtype: str = "float32", *, limits: Limits = DEFAULT_LIMITS
) -> tuple[bytes, dict[str, np.ndarray]]:
    """ImportanceReport -> (header bytes, arrays keyed '<task>/<group>' in `dtype`).

    float16 halves the upload; a score too large for float16 is refused rather than sent as inf.
    """
    where = "ImportanceReport"
    if dtype not in SCORE_DTYPES:
        fail(where, f"unsupported score dtype {dtype!r}; use one of {', '.join(SCORE_DTYPES)}")
    report.validate(limits=limits)
    arrays: dict[str, np.ndarray] = {}
    header = pb.ImportanceReport(
        protocol_version=report.protocol_version,
        device_id=report.device_id,
        base_model_id=report.base_model_id,
        base_model_sha256=report.base_model_sha256,
        dtype=_DTYPE_TO_PB[dtype],
    )
    for task, groups in report.scores.items():
        header.tasks.add(task=task, samples_used=int(report.samples_used[task]), group_names=list(groups))
        for group, vec in groups.items():
            with np.errstate(over="ignore"):
                wire = np.ascontiguousarray(vec, dtype=dtype)
            if not np.isfinite(wire).all():
                fail(where, f"task {task!r}, group {group!r}: scores overflow {dtype}; normalise or use float32")
            arrays[report_key(task, group)] = wire
    nbytes = sum(a.nbytes for a in arrays.values())
    if nbytes > limits.max_array_bytes:
        fail(where, f"score arrays are {nbytes} bytes (max {limits.max_array_bytes})")
    if len(arrays) > limits.max_arrays:
        fail(where, f"{len(arrays)} score vectors (max {limits.max_arrays})")
    return _serialize(header, where, limits), arrays


def decode_report(
    header: bytes,
    arrays: Mapping[str, np.ndarray],
    *,
    known_tasks: Collection[str] | None = None,
    group_sizes: Mapping[str, int] | None = None,
    task_groups: Mapping[str, Collection[str]] | None = None,
    base_model_sha256: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ImportanceReport:
    """(header bytes, arrays) -> validated ImportanceReport with float32 score vectors.

    The arrays must be exactly the ones the header names, in the dtype it declares; see
    ImportanceReport.validate for `group_sizes` and `task_groups`.
    """
    where = "ImportanceReport"
    msg = _parse(pb.ImportanceReport, header, where, limits)
    if msg.dtype not in _DTYPE_FROM_PB:
        fail(where, f"unknown score dtype {msg.dtype} on the wire")
    dtype = np.dtype(_DTYPE_FROM_PB[msg.dtype])
    check_arrays(where, arrays, limits)
    tasks = [t.task for t in msg.tasks]
    check_tasks(where, tasks, known_tasks, limits)
    expected: dict[str, tuple[str, str]] = {}
    for entry in msg.tasks:
        if len(entry.group_names) > limits.max_groups:
            fail(where, f"task {entry.task!r}: {len(entry.group_names)} groups (max {limits.max_groups})")
        for group in entry.group_names:
            check_name(where, f"task {entry.task!r}: group name", group, limits)
            key = report_key(entry.task, group)
            if key in expected:
                fail(where, f"task {entry.task!r}: group {group!r} is named twice")
            expected[key] = (entry.task, group)
            if len(expected) > limits.max_arrays:
                fail(where, f"the header names more than {limits.max_arrays} score vectors")
    missing = set(expected) - set(arrays)
    if missing:
        fail(where, f"missing score array(s) {sorted(missing)[:5]} named by the header")
    extra = set(arrays) - set(expected)
    if extra:
        fail(where, f"unexpected array(s) {sorted(map(repr, extra))[:5]} not named by the header")
    scores: dict[str, dict[str, np.ndarray]] = {t: {} for t in tasks}
    for key, (task, group) in expected.items():
        arr = arrays[key]
        if arr.dtype != dtype:
            fail(where, f"array {key!r} has dtype {arr.dtype}, the header says {dtype}")
        # Shapes before the copy below, so a huge or misshapen array is refused without converting it.
        if arr.ndim != 1 or arr.size == 0:
            fail(where, f"task {task!r}, group {group!r}: scores must be a non-empty 1-D vector, got shape {arr.shape}")
        size = group_sizes.get(group) if group_sizes is not None else None
        if size is not None and len(arr) != size:
            fail(where, f"task {task!r}, group {group!r}: {len(arr)} scores, expected {size} (group size)")
        scores[task][group] = np.array(arr, dtype=np.float32)  # a private float32 copy
    report = ImportanceReport(
        device_id=msg.device_id,
        base_model_id=msg.base_model_id,
        base_model_sha256=msg.base_model_sha256,
        scores=scores,
        samples_used={t.task: t.samples_used for t in msg.tasks},
        protocol_version=msg.protocol_version,
    )
    report.validate(known_tasks, group_sizes, task_groups, base_model_sha256, limits)
    return report


def check_arrays(where: str, arrays: Any, limits: Limits = DEFAULT_LIMITS) -> None:
    """Arrays beside a header: a str -> ndarray mapping (no object dtypes), bounded in count and bytes."""
    if not isinstance(arrays, Mapping):
        fail(where, f"arrays must be a mapping name -> numpy array, got {type(arrays).__name__}")
    if len(arrays) > limits.max_arrays:
        fail(where, f"{len(arrays)} arrays (max {limits.max_arrays})")
    nbytes = 0
    for key, arr in arrays.items():
        if not isinstance(key, str):
            fail(where, f"array keys must be strings, got {type(key).__name__}")
        if not isinstance(arr, np.ndarray):
            fail(where, f"array {key!r:.80} is a {type(arr).__name__}, not a numpy array")
        if arr.dtype.hasobject:
            fail(where, f"array {key!r:.80} has an object dtype")
        nbytes += arr.nbytes
        if nbytes > limits.max_array_bytes:
            fail(where, f"arrays exceed {limits.max_array_bytes} bytes (too large)")


def report_limits(
    tasks: Collection[str],
    group_sizes: Mapping[str, int],
    task_groups: Mapping[str, Collection[str]] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Limits:
    """`limits` tightened to the one ImportanceReport a device can validly send for `tasks`: one array per
    (task, group) and one float32 (the widest score dtype) per channel. A receiver passes them to the code
    that reads the arrays off the transport, so an oversized upload is refused before it is even parsed."""
    arrays = elements = 0
    for task in tasks:
        expected = task_groups.get(task) if task_groups is not None else None
        for group in expected if expected is not None else group_sizes:
            arrays += 1
            elements += int(group_sizes.get(group, 0))
    itemsize = max(np.dtype(d).itemsize for d in SCORE_DTYPES)
    return dataclasses.replace(
        limits,
        max_arrays=min(limits.max_arrays, arrays),
        max_array_bytes=min(limits.max_array_bytes, elements * itemsize),
        max_elements=min(limits.max_elements, elements),
    )


def arrays_limits(reference: Mapping[str, np.ndarray], limits: Limits = DEFAULT_LIMITS) -> Limits:
    """`limits` tightened to arrays shaped like `reference` (e.g. a fine-tuned update of a plan's weights):
    as many arrays and bytes as it has, so a bloated upload is refused before it is parsed."""
    nbytes = sum(int(np.asarray(a).nbytes) for a in reference.values())
    return dataclasses.replace(
        limits, max_arrays=min(limits.max_arrays, len(reference)), max_array_bytes=min(limits.max_array_bytes, nbytes)
    )


def payload_nbytes(header: bytes, arrays: Mapping[str, np.ndarray] | None = None) -> int:
    """Bytes a message puts on the wire: header + array keys + array data (transport framing aside)."""
    arrays = arrays or {}
    return len(header) + sum(len(k.encode()) + a.nbytes for k, a in arrays.items())


# ------------------------------------------------------------------------------- PruningPlan


def _plan_to_pb(plan: PruningPlan, where: str) -> pb.PruningPlan:
    def fill() -> pb.PruningPlan:
        msg = pb.PruningPlan(
            protocol_version=PROTOCOL_VERSION,
            base_model_sha256=plan.base_model_sha256,
            tasks=list(plan.tasks),
            budget_kind=_BUDGET_TO_PB[plan.budget_kind],
            budget_value=float(plan.budget_value),
            method=plan.method,
            plan_hash=plan.plan_hash,
            plan_format_version=plan.version,
        )
        for name, keep in plan.keep.items():
            msg.groups.add(name=name, size=int(plan.group_sizes[name]), keep=[int(i) for i in keep])
        msg.achieved.update({k: float(v) for k, v in plan.achieved.items()})
        return msg

    return _build(where, fill)


def _plan_from_pb(msg: pb.PruningPlan, where: str) -> PruningPlan:
    """Protobuf -> PruningPlan; the stored hash must match the content (tamper/corruption check)."""
    check_protocol_version(where, msg.protocol_version)
    if msg.plan_format_version != PLAN_FORMAT_VERSION:
        fail(where, f"plan format version {msg.plan_format_version} is not supported (expected {PLAN_FORMAT_VERSION})")
    names = [g.name for g in msg.groups]
    if len(set(names)) != len(names):
        dups = sorted(n for n, c in Counter(names).items() if c > 1)
        fail(where, f"group(s) {dups[:5]} listed twice")
    try:
        plan = PruningPlan(
            base_model_sha256=msg.base_model_sha256,
            tasks=tuple(msg.tasks),
            keep={g.name: tuple(g.keep) for g in msg.groups},
            group_sizes={g.name: g.size for g in msg.groups},
            budget_kind=_budget_kind(where, msg.budget_kind),
            budget_value=msg.budget_value,
            method=msg.method,
            achieved=dict(msg.achieved),
            version=msg.plan_format_version,
        )
    except ValidationError:
        raise
    except (ValueError, TypeError, IndexError) as e:
        fail(where, f"invalid plan ({e})")
    if msg.plan_hash != plan.plan_hash:
        fail(
            where, f"plan hash mismatch: message says {msg.plan_hash[:12]!r}, content hashes to {plan.plan_hash[:12]!r}"
        )
    return plan


def encode_plan(plan: PruningPlan, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """PruningPlan -> protobuf bytes (validated first; carries its plan hash)."""
    validate_plan(plan, limits=limits)
    return _serialize(_plan_to_pb(plan, "PruningPlan"), "PruningPlan", limits)


def decode_plan(
    data: bytes,
    *,
    known_tasks: Collection[str] | None = None,
    base_model_sha256: str | None = None,
    group_sizes: Mapping[str, int] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> PruningPlan:
    """Protobuf bytes -> validated PruningPlan whose recomputed hash equals the transmitted one."""
    msg = _parse(pb.PruningPlan, data, "PruningPlan", limits)
    plan = _plan_from_pb(msg, "PruningPlan")
    validate_plan(plan, known_tasks, base_model_sha256, group_sizes, limits)
    return plan


# -------------------------------------------------------------------------- CompactModelSpec


def encode_spec(spec: CompactModelSpec, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """CompactModelSpec -> protobuf bytes (validated first); the weights travel separately."""
    where = "CompactModelSpec"
    spec.validate(limits=limits)

    def fill() -> pb.CompactModelSpec:
        msg = pb.CompactModelSpec(
            protocol_version=spec.protocol_version,
            plan=_plan_to_pb(spec.plan, f"{where}.plan"),
            architecture_json=architecture_json(spec.architecture, limits, where),
            weights_sha256=spec.weights_sha256,
            tasks=list(spec.tasks),
        )
        msg.expected_metrics.update({k: float(v) for k, v in spec.expected_metrics.items()})
        return msg

    return _serialize(_build(where, fill), where, limits)


def decode_spec(
    data: bytes,
    *,
    known_tasks: Collection[str] | None = None,
    base_model_sha256: str | None = None,
    group_sizes: Mapping[str, int] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> CompactModelSpec:
    """Protobuf bytes -> validated CompactModelSpec (architecture parsed from strict JSON)."""
    where = "CompactModelSpec"
    msg = _parse(pb.CompactModelSpec, data, where, limits)
    if not msg.HasField("plan"):
        fail(where, "missing plan")
    spec = CompactModelSpec(
        plan=_plan_from_pb(msg.plan, f"{where}.plan"),
        architecture=_loads_architecture(msg.architecture_json, where),
        weights_sha256=msg.weights_sha256,
        tasks=tuple(msg.tasks),
        expected_metrics=dict(msg.expected_metrics),
        protocol_version=msg.protocol_version,
    )
    spec.validate(known_tasks, base_model_sha256, group_sizes, limits)
    return spec


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads_architecture(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        fail(where, f"architecture_json is not valid JSON ({e})")
    if not isinstance(value, dict):
        fail(where, f"architecture_json must hold a JSON object, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------ weights


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over named arrays (sorted names, dtype, shape, C-order bytes): the weights_sha256 of a
    CompactModelSpec, computable in any language without pickles."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.require(arrays[name], requirements="C")  # keeps 0-d arrays 0-d (ascontiguousarray does not)
        meta = f"{name}\0{arr.dtype.str}\0{','.join(map(str, arr.shape))}\0"
        h.update(len(meta).to_bytes(8, "little") + meta.encode())
        h.update(arr.nbytes.to_bytes(8, "little"))
        h.update(arr.tobytes())
    return h.hexdigest()


def verify_weights(
    spec: CompactModelSpec, arrays: Mapping[str, np.ndarray], *, limits: Limits = DEFAULT_LIMITS
) -> None:
    """A device checks the weights it received are the ones the spec was built for."""
    if not isinstance(spec, CompactModelSpec):
        fail("CompactModelSpec", f"expected a CompactModelSpec, got {type(spec).__name__}")
    check_arrays("CompactModelSpec weights", arrays, limits)
    got = arrays_sha256(arrays)
    if got != spec.weights_sha256:
        fail("CompactModelSpec", f"weights sha256 mismatch: got {got[:12]}..., expected {spec.weights_sha256[:12]}...")
