"""The messages between server and devices as plain dataclasses, and the rules they must obey.

One file for the five contract messages and their validation rules (about 480 lines), read as a unit.

cut's code works with these dataclasses; only cut/wire.py turns them into protobuf bytes and named
arrays. Every rule of the contract lives here, so an inbound message is checked the same way on the
server and on a device, and a bad one is rejected with a `ValidationError` that names the problem
instead of failing somewhere deep inside aggregation or model rebuilding.

Validators take optional context (the known task names, the expected base model sha256, the
channel groups and their sizes): without it they check what the message alone can tell.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from cut.plan import PLAN_FORMAT_VERSION, PruningPlan

PROTOCOL_VERSION = 1
BUDGET_KINDS = ("params", "macs", "memory", "latency")
SCORE_DTYPES = ("float16", "float32")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
MAX_MEMORY_BYTES = 1e15  # the largest memory budget a Budget may name (1 PB; cut.memory.MAX_BYTES)
_INT64_MAX = 2**63 - 1


class ValidationError(ValueError):
    """A message breaks the contract; the text says which message, which field and why."""


@dataclass(frozen=True)
class Limits:
    """Size bounds, so that one oversized or hostile message cannot exhaust its receiver."""

    max_header_bytes: int = 4 << 20  # one serialised protobuf message
    max_array_bytes: int = 256 << 20  # all arrays next to one message together
    max_elements: int = 32 << 20  # score elements in one report, kept indices in one plan
    max_tasks: int = 64
    max_groups: int = 100_000  # channel groups per task (report) or per plan
    max_name_len: int = 256  # ids, task, group, criterion and metric names
    max_arrays: int = 100_000  # named arrays next to one message (score vectors, a model's state dict)
    max_metrics: int = 4096  # entries of one metric record (per task and metric, dense and compact)


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------- small checks shared by messages


def fail(where: str, why: str) -> NoReturn:
    raise ValidationError(f"{where}: {why}")


def _show(names: Iterable[Any], limit: int = 5) -> str:
    """A short, readable list of offending names (messages stay one line even for huge inputs)."""
    items = sorted(repr(n)[:80] for n in names)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_protocol_version(where: str, version: Any) -> None:
    if version != PROTOCOL_VERSION:
        fail(where, f"protocol version {version!r} is not supported (expected {PROTOCOL_VERSION})")


def check_name(where: str, what: str, value: Any, limits: Limits = DEFAULT_LIMITS) -> None:
    """Ids and names: non-empty strings of bounded length."""
    if not isinstance(value, str) or not value:
        fail(where, f"{what} must be a non-empty string, got {value!r:.80}")
    if len(value) > limits.max_name_len:
        fail(where, f"{what} is {len(value)} characters long (max {limits.max_name_len})")
    if not value.isprintable():  # names end up in logs and report tables: one line, no control characters
        fail(where, f"{what} contains control or non-printable characters: {value!r:.80}")


def check_sha256(where: str, what: str, value: Any, expected: str | None = None) -> None:
    """A sha256 field must look like one and, when the receiver knows it, match its own."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        fail(where, f"{what} must be 64 lowercase hex characters, got {value!r:.80}")
    if expected is not None and value != expected:
        fail(where, f"{what} mismatch: got {value[:12]}..., expected {expected[:12]}...")


def check_tasks(
    where: str,
    tasks: Any,
    known_tasks: Collection[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """A task list: non-empty, no duplicates, identifiers (so '<task>/<group>' keys split), known."""
    if isinstance(tasks, str) or not isinstance(tasks, Iterable):
        fail(where, f"tasks must be a sequence of names, got {type(tasks).__name__}")
    tasks = list(tasks)
    if not tasks:
        fail(where, "empty task list")
    if len(tasks) > limits.max_tasks:
        fail(where, f"{len(tasks)} tasks (max {limits.max_tasks})")
    bad = [t for t in tasks if not isinstance(t, str) or not t.isidentifier() or len(t) > limits.max_name_len]
    if bad:
        fail(where, f"task names must be identifiers, got {_show(bad)}")
    dups = {t for t in tasks if tasks.count(t) > 1}
    if dups:
        fail(where, f"duplicate task(s) {_show(dups)}")
    if known_tasks is not None:
        unknown = [t for t in tasks if t not in known_tasks]
        if unknown:
            fail(where, f"unknown task(s) {_show(unknown)}; known: {_show(known_tasks, 20)}")


def check_fraction(where: str, what: str, value: Any) -> None:
    """Budgets are fractions of the decomposed model: in (0, 1]."""
    if not _is_real(value) or not math.isfinite(value) or not 0.0 < value <= 1.0:
        fail(where, f"{what} {value!r} is outside (0, 1]")


def _check_real_map(
    where: str, what: str, values: Any, *, finite: bool = True, non_negative: bool, limits: Limits
) -> None:
    if not isinstance(values, Mapping):
        fail(where, f"{what} must be a mapping, got {type(values).__name__}")
    if len(values) > limits.max_groups:
        fail(where, f"{what} has {len(values)} entries (max {limits.max_groups})")
    for key, value in values.items():
        check_name(where, f"{what} key", key, limits)
        if not _is_real(value) or (finite and not math.isfinite(value)):
            fail(where, f"{what}[{key!r}] must be a finite number, got {value!r}")
        if non_negative and value < 0:
            fail(where, f"{what}[{key!r}] is negative ({value!r})")


def _check_keys_among(where: str, what: str, keys: Iterable[str], tasks: Collection[str]) -> None:
    extra = [k for k in keys if k not in tasks]
    if extra:
        fail(where, f"{what} names task(s) {_show(extra)} that are not in the task list")


def check_count(where: str, what: str, value: Any, *, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        fail(where, f"{what} must be an integer in [{low}, {high}], got {value!r}")


# ---------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Budget:
    """How much of the decomposed model may remain, as a fraction of its params, MACs, memory or latency.

    A latency budget comes with the table the device measured on its own runtime (`cut.latency`), and may
    be given in milliseconds there (`milliseconds` > 0; the server plans min(1, ms / table.dense_ms)).
    A memory budget (`cut.memory`: weight + peak activation bytes of batch-1 inference) needs nothing from
    the device, and may be given in bytes (`memory_bytes` > 0; the server plans min(1, bytes / dense)).
    """

    kind: str = "params"  # one of BUDGET_KINDS
    value: float = 1.0  # in (0, 1]
    milliseconds: float = 0.0  # latency only: the budget in ms on the device (0: `value` is the fraction)
    latency_table: Any = None  # latency only, required: a cut.latency.LatencyTable
    memory_bytes: float = 0.0  # memory only: the budget in bytes (0: `value` is the fraction)

    def validate(self, where: str = "Budget", limits: Limits = DEFAULT_LIMITS) -> None:
        if self.kind not in BUDGET_KINDS:
            fail(where, f"unknown budget kind {self.kind!r}; known: {', '.join(BUDGET_KINDS)}")
        check_fraction(where, "budget value", self.value)
        ms = self.milliseconds
        if not _is_real(ms) or not math.isfinite(ms) or not 0 <= ms < 1e7:
            fail(where, f"milliseconds {ms!r} must be a finite number in [0, 1e7)")
        nbytes = self.memory_bytes
        if not _is_real(nbytes) or not math.isfinite(nbytes) or not (nbytes == 0 or 1 <= nbytes <= MAX_MEMORY_BYTES):
            fail(where, f"memory_bytes {nbytes!r} must be 0 or a number of bytes in [1, {MAX_MEMORY_BYTES:g}]")
        if nbytes and self.kind != "memory":
            fail(where, f"memory_bytes belong to a memory budget, not {self.kind!r}")
        if self.kind != "latency":
            if ms or self.latency_table is not None:
                fail(where, f"milliseconds and a latency table belong to a latency budget, not {self.kind!r}")
            return
        if self.latency_table is None:
            fail(where, "a latency budget needs the latency table measured on the device")
        validate_latency_table(self.latency_table, f"{where}.latency_table", limits)


def validate_latency_table(table: Any, where: str = "LatencyTable", limits: Limits = DEFAULT_LIMITS) -> None:
    """A device's latency table: well formed (cut.latency.LatencyTable.check), bounded, names printable."""
    from cut.latency import LatencyTable

    if not isinstance(table, LatencyTable):
        fail(where, f"expected a cut.latency.LatencyTable, got {type(table).__name__}")
    try:
        table.check()
    except ValueError as e:
        fail(where, str(e))
    check_sha256(where, "base_model_sha256", table.base_model_sha256)
    check_tasks(where, table.tasks, None, limits)
    check_name(where, "runtime", table.runtime, limits)
    for layer in table.layers:
        check_name(where, "layer name", layer.name, limits)


@dataclass(frozen=True)
class TaskProfile:
    """device -> server: the tasks a device wants, its budget and how much data it holds."""

    device_id: str
    tasks: tuple[str, ...]
    budget: Budget
    device_class: str = ""
    task_priority: dict[str, float] = field(default_factory=dict)  # optional, keys among tasks
    samples_per_task: dict[str, int] = field(default_factory=dict)  # keys among tasks
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, (str, tuple)) and isinstance(self.tasks, Iterable):
            object.__setattr__(self, "tasks", tuple(self.tasks))

    def validate(self, known_tasks: Collection[str] | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        where = "TaskProfile"
        check_protocol_version(where, self.protocol_version)
        check_name(where, "device_id", self.device_id, limits)
        if not isinstance(self.device_class, str) or len(self.device_class) > limits.max_name_len:
            fail(where, f"device_class must be a string of at most {limits.max_name_len} characters")
        if not self.device_class.isprintable():
            fail(where, f"device_class contains control or non-printable characters: {self.device_class!r:.80}")
        check_tasks(where, self.tasks, known_tasks, limits)
        if not isinstance(self.budget, Budget):
            fail(where, "missing budget")
        self.budget.validate(f"{where}.budget", limits)
        table = self.budget.latency_table
        if table is not None and set(table.tasks) != set(self.tasks):
            fail(where, f"the latency table was measured for tasks {list(table.tasks)}, not {list(self.tasks)}")
        _check_real_map(where, "task_priority", self.task_priority, non_negative=True, limits=limits)
        _check_keys_among(where, "task_priority", self.task_priority, self.tasks)
        if not isinstance(self.samples_per_task, Mapping):
            fail(where, "samples_per_task must be a mapping")
        _check_keys_among(where, "samples_per_task", self.samples_per_task, self.tasks)
        for task, n in self.samples_per_task.items():
            check_count(where, f"samples_per_task[{task!r}]", n, low=0, high=_INT64_MAX)


@dataclass(frozen=True)
class PrivacySettings:
    """What a device does to its scores before they leave it: clip to a norm, add Gaussian noise.

    No noise seed: the device draws its noise from fresh OS entropy. A seed chosen by the server would let
    a curious server regenerate the noise and subtract it from the reports.
    """

    clip_norm: float = 0.0  # 0 = no clipping
    noise_multiplier: float = 0.0  # noise std = noise_multiplier * clip_norm; 0 = no noise

    def validate(self, where: str = "PrivacySettings") -> None:
        for what in ("clip_norm", "noise_multiplier"):
            value = getattr(self, what)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                fail(where, f"{what} must be a finite number >= 0, got {value!r}")
        if self.noise_multiplier > 0 and self.clip_norm <= 0:
            fail(where, "noise_multiplier > 0 needs clip_norm > 0 (noise is scaled to the clip norm)")


@dataclass(frozen=True)
class ScoringRequest:
    """server -> device: score these tasks on the model with this sha256, with this criterion."""

    base_model_id: str
    base_model_sha256: str
    tasks: tuple[str, ...]
    criterion: str
    num_batches: int
    batch_size: int
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, (str, tuple)) and isinstance(self.tasks, Iterable):
            object.__setattr__(self, "tasks", tuple(self.tasks))

    def validate(
        self,
        known_tasks: Collection[str] | None = None,
        base_model_sha256: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        where = "ScoringRequest"
        check_protocol_version(where, self.protocol_version)
        check_name(where, "base_model_id", self.base_model_id, limits)
        check_sha256(where, "base_model_sha256", self.base_model_sha256, base_model_sha256)
        check_tasks(where, self.tasks, known_tasks, limits)
        check_name(where, "criterion", self.criterion, limits)
        check_count(where, "num_batches", self.num_batches, low=1, high=_UINT32_MAX)
        check_count(where, "batch_size", self.batch_size, low=1, high=_UINT32_MAX)
        if not isinstance(self.privacy, PrivacySettings):
            fail(where, "missing privacy settings")
        self.privacy.validate(f"{where}.privacy")


@dataclass(frozen=True, eq=False)
class ImportanceReport:
    """device -> server: per task, one importance vector per channel group, and samples used.

    `scores[task][group]` is a 1-D float vector, one entry per channel of the group. Equality compares
    the vectors by value (a dataclass-generated __eq__ would fail on numpy arrays).
    """

    device_id: str
    base_model_id: str
    base_model_sha256: str
    scores: dict[str, dict[str, np.ndarray]]
    samples_used: dict[str, int]
    protocol_version: int = PROTOCOL_VERSION

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.scores)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImportanceReport):
            return NotImplemented
        head = ("device_id", "base_model_id", "base_model_sha256", "samples_used", "protocol_version")
        if any(getattr(self, a) != getattr(other, a) for a in head):
            return False
        if list(self.scores) != list(other.scores):
            return False
        for task, groups in self.scores.items():
            theirs = other.scores[task]
            if set(groups) != set(theirs):
                return False
            if not all(np.array_equal(v, theirs[g]) for g, v in groups.items()):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable payload, like the dicts it holds

    def validate(
        self,
        known_tasks: Collection[str] | None = None,
        group_sizes: Mapping[str, int] | None = None,
        task_groups: Mapping[str, Collection[str]] | None = None,
        base_model_sha256: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        """`group_sizes`: every scorable group and its channel count. `task_groups` (optional):
        the groups each task must report (default: all of `group_sizes`), e.g. only its own head."""
        where = "ImportanceReport"
        check_protocol_version(where, self.protocol_version)
        check_name(where, "device_id", self.device_id, limits)
        check_name(where, "base_model_id", self.base_model_id, limits)
        check_sha256(where, "base_model_sha256", self.base_model_sha256, base_model_sha256)
        if not isinstance(self.scores, Mapping):
            fail(where, "scores must be a mapping task -> group -> vector")
        check_tasks(where, list(self.scores), known_tasks, limits)
        if not isinstance(self.samples_used, Mapping):
            fail(where, f"samples_used must be a mapping task -> count, got {type(self.samples_used).__name__}")
        if set(self.samples_used) != set(self.scores):
            fail(where, f"samples_used names tasks {_show(self.samples_used)} but scores name {_show(self.scores)}")
        for task, n in self.samples_used.items():
            check_count(where, f"samples_used[{task!r}]", n, low=0, high=_INT64_MAX)
        total = 0
        for task, groups in self.scores.items():
            total += _check_task_scores(where, task, groups, limits)
            if total > limits.max_elements:
                fail(where, f"more than {limits.max_elements} score elements (too large)")
            if group_sizes is not None:
                expected = task_groups.get(task) if task_groups is not None else None
                _check_groups_match(where, task, groups, group_sizes, expected)


def _check_task_scores(where: str, task: str, groups: Any, limits: Limits) -> int:
    """One task's vectors: 1-D, floating, finite, non-negative. Returns the element count."""
    if not isinstance(groups, Mapping) or not groups:
        fail(where, f"task {task!r}: scores must be a non-empty mapping group -> vector")
    if len(groups) > limits.max_groups:
        fail(where, f"task {task!r}: {len(groups)} groups (max {limits.max_groups})")
    count = 0
    for group, vec in groups.items():
        check_name(where, f"task {task!r}: group name", group, limits)
        at = f"task {task!r}, group {group!r}"
        if not isinstance(vec, np.ndarray) or vec.dtype.kind != "f":
            fail(where, f"{at}: scores must be a floating numpy array, got {type(vec).__name__}")
        if vec.ndim != 1 or vec.size == 0:
            fail(where, f"{at}: scores must be a non-empty 1-D vector, got shape {vec.shape}")
        count += vec.size
        if count > limits.max_elements:
            fail(where, f"more than {limits.max_elements} score elements (too large)")
        if not np.isfinite(vec).all():
            fail(where, f"{at}: scores contain NaN or inf")
        if (vec < 0).any():
            fail(where, f"{at}: scores contain negative values (min {float(vec.min())!r})")
    return count


def _check_groups_match(
    where: str,
    task: str,
    groups: Mapping[str, np.ndarray],
    group_sizes: Mapping[str, int],
    expected: Collection[str] | None,
) -> None:
    """The report must name exactly the expected groups, each with one score per channel."""
    want = set(expected) if expected is not None else set(group_sizes)
    missing = want - set(groups)
    if missing:
        fail(where, f"task {task!r}: missing score vector(s) for group(s) {_show(missing)}")
    extra = set(groups) - want
    if extra:
        fail(where, f"task {task!r}: unexpected (extra) group(s) {_show(extra)}")
    for group, vec in groups.items():
        size = group_sizes.get(group)
        if size is not None and len(vec) != size:
            fail(where, f"task {task!r}, group {group!r}: {len(vec)} scores, expected {size} (group size)")


def validate_plan(
    plan: Any,
    known_tasks: Collection[str] | None = None,
    base_model_sha256: str | None = None,
    group_sizes: Mapping[str, int] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    where: str = "PruningPlan",
) -> None:
    """Contract rules for a cut.plan.PruningPlan (the dataclass itself checks index sanity)."""
    if not isinstance(plan, PruningPlan):
        fail(where, f"expected a cut.plan.PruningPlan, got {type(plan).__name__}")
    if plan.version != PLAN_FORMAT_VERSION:
        fail(where, f"plan format version {plan.version!r} is not supported (expected {PLAN_FORMAT_VERSION})")
    check_sha256(where, "base_model_sha256", plan.base_model_sha256, base_model_sha256)
    check_tasks(where, plan.tasks, known_tasks, limits)
    if plan.budget_kind not in BUDGET_KINDS:
        fail(where, f"unknown budget kind {plan.budget_kind!r}; known: {', '.join(BUDGET_KINDS)}")
    check_fraction(where, "budget value", plan.budget_value)
    check_name(where, "method", plan.method, limits)
    _check_real_map(where, "achieved", plan.achieved, non_negative=False, limits=limits)
    if not plan.keep:
        fail(where, "plan keeps no group")
    if len(plan.keep) > limits.max_groups:
        fail(where, f"{len(plan.keep)} groups (max {limits.max_groups})")
    kept = 0
    for name, size in plan.group_sizes.items():
        check_name(where, "group name", name, limits)
        check_count(where, f"size of group {name!r}", size, low=1, high=_INT32_MAX)
        kept += len(plan.keep[name])
    if kept > limits.max_elements:
        fail(where, f"more than {limits.max_elements} kept indices (too large)")
    if group_sizes is not None:
        missing = set(group_sizes) - set(plan.group_sizes)
        extra = set(plan.group_sizes) - set(group_sizes)
        if missing:
            fail(where, f"missing group(s) {_show(missing)}")
        if extra:
            fail(where, f"unexpected (extra) group(s) {_show(extra)}")
        wrong = [g for g, n in plan.group_sizes.items() if n != group_sizes[g]]
        if wrong:
            g = sorted(wrong)[0]
            fail(where, f"group {g!r} has size {plan.group_sizes[g]}, expected {group_sizes[g]}")


@dataclass(frozen=True)
class CompactModelSpec:
    """server -> device: plan + architecture config + weights sha256: all a device needs to rebuild
    the compact model from the weight arrays that travel next to it (no pickled modules)."""

    plan: PruningPlan
    architecture: dict[str, Any]  # plain JSON (it travels as JSON text)
    weights_sha256: str
    tasks: tuple[str, ...]
    expected_metrics: dict[str, float] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, (str, tuple)) and isinstance(self.tasks, Iterable):
            object.__setattr__(self, "tasks", tuple(self.tasks))

    def validate(
        self,
        known_tasks: Collection[str] | None = None,
        base_model_sha256: str | None = None,
        group_sizes: Mapping[str, int] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        where = "CompactModelSpec"
        check_protocol_version(where, self.protocol_version)
        validate_plan(self.plan, known_tasks, base_model_sha256, group_sizes, limits, f"{where}.plan")
        check_tasks(where, self.tasks, known_tasks, limits)
        if tuple(self.tasks) != tuple(self.plan.tasks):
            fail(where, f"tasks {list(self.tasks)} differ from the plan's tasks {list(self.plan.tasks)}")
        check_sha256(where, "weights_sha256", self.weights_sha256)
        _check_real_map(where, "expected_metrics", self.expected_metrics, non_negative=False, limits=limits)
        architecture_json(self.architecture, limits, where)


def architecture_json(architecture: Any, limits: Limits = DEFAULT_LIMITS, where: str = "CompactModelSpec") -> str:
    """Canonical JSON text of an architecture config; it must read back equal, so only plain JSON
    types are allowed (a tuple or an int key would come back changed)."""
    if not isinstance(architecture, dict):
        fail(where, f"architecture must be a dict, got {type(architecture).__name__}")
    try:
        text = json.dumps(architecture, sort_keys=True, separators=(",", ":"), allow_nan=False)
        same = json.loads(text) == architecture
    except (TypeError, ValueError, RecursionError) as e:
        fail(where, f"architecture is not plain JSON ({e})")
    if not same:
        fail(where, "architecture does not survive JSON unchanged (use lists, str keys, no tuples)")
    if len(text) > limits.max_header_bytes:
        fail(where, f"architecture JSON is {len(text)} bytes (max {limits.max_header_bytes})")
    return text
