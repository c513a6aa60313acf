"""Property tests: whatever arrives, a decoder returns a valid message or raises ValidationError.

A device or a server must never crash (or leak a protobuf/numpy exception into aggregation) on a
malformed message; the federation rejects it with a reason and goes on. Rejecting is not enough either:
valid input must be accepted. Where the fuzzed input's validity can be told independently (edited profiles
and requests, report arrays), an oracle written from the contract's rules says whether it must be accepted
or rejected; every accepted message must round-trip through its encoder unchanged.

Long because every inbound path has its own strategy and oracle.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cut import wire
from cut.latency import LatencyTable, LayerTiming
from cut.messages import (
    Budget,
    CompactModelSpec,
    ImportanceReport,
    Limits,
    ScoringRequest,
    TaskProfile,
    ValidationError,
    validate_plan,
)
from cut.plan import PruningPlan
from cut.proto import cutfl_pb2 as pb

SHA = hashlib.sha256(b"base model").hexdigest()
GROUPS = {"backbone.layer1": 8, "heads.seg.0": 4}


def make_report(**kw) -> ImportanceReport:
    scores = {t: {g: np.linspace(0, 1, n, dtype=np.float32) for g, n in GROUPS.items()} for t in ("seg", "depth")}
    base = dict(device_id="d1", base_model_id="m", base_model_sha256=SHA, scores=scores)
    return ImportanceReport(**{**base, "samples_used": {"seg": 3, "depth": 4}, **kw})


def make_plan() -> PruningPlan:
    keep = {"backbone.layer1": (0, 3), "heads.seg.0": (1,)}
    return PruningPlan(base_model_sha256=SHA, tasks=("seg", "depth"), keep=keep, group_sizes=dict(GROUPS))


def make_spec() -> CompactModelSpec:
    return CompactModelSpec(
        plan=make_plan(), architecture={"backbone": "resnet18"}, weights_sha256=SHA, tasks=("seg", "depth")
    )


PROFILE = TaskProfile(device_id="d1", tasks=("seg",), budget=Budget("params", 0.5), samples_per_task={"seg": 3})
TABLE = LatencyTable(
    base_model_sha256=SHA, tasks=("seg",), input_size=(64, 64), runtime="onnxruntime 1.32.0 CPU", threads=1,
    round_to=16, calibration=((0.5, 0.6), (1.0, 1.2)), dense_ms=1.2,
    layers=(LayerTiming("backbone.conv1", (3,), (8, 16), ((5.0, 9.5),)),
            LayerTiming("heads.seg.0", (8, 16), (4,), ((1.0,), (2.0,)))),
)
LATENCY_PROFILE = TaskProfile(device_id="d2", tasks=("seg",), budget=Budget("latency", 1.0, milliseconds=0.8,
                                                                             latency_table=TABLE))
MEMORY_PROFILE = TaskProfile(device_id="d3", tasks=("seg",), budget=Budget("memory", 1.0, memory_bytes=3e6))
REQUEST = ScoringRequest(
    base_model_id="m", base_model_sha256=SHA, tasks=("seg", "depth"), criterion="taylor", num_batches=2, batch_size=4
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_header_bytes=64 << 10, max_array_bytes=1 << 20, max_elements=1 << 16)

LATENCY_PROFILE_BYTES = wire.encode_profile(LATENCY_PROFILE)
MEMORY_PROFILE_BYTES = wire.encode_profile(MEMORY_PROFILE)
VALID_BYTES = {
    "profile": wire.encode_profile(PROFILE),
    "request": wire.encode_request(REQUEST),
    "plan": wire.encode_plan(make_plan()),
    "spec": wire.encode_spec(make_spec()),
    "report": wire.encode_report(make_report())[0],
}


def _decode(name: str, data: bytes, arrays=None):
    """Run one decoder; the result must itself pass validation."""
    if name == "profile":
        out = wire.decode_profile(data, limits=SMALL)
        assert isinstance(out, TaskProfile)
        out.validate(limits=SMALL)
    elif name == "request":
        out = wire.decode_request(data, limits=SMALL)
        assert isinstance(out, ScoringRequest)
        out.validate(limits=SMALL)
    elif name == "plan":
        out = wire.decode_plan(data, limits=SMALL)
        assert isinstance(out, PruningPlan)
        validate_plan(out, limits=SMALL)
    elif name == "spec":
        out = wire.decode_spec(data, limits=SMALL)
        assert isinstance(out, CompactModelSpec)
        out.validate(limits=SMALL)
    else:
        out = wire.decode_report(data, arrays if arrays is not None else {}, group_sizes=GROUPS, limits=SMALL)
        assert isinstance(out, ImportanceReport)
        out.validate(group_sizes=GROUPS, limits=SMALL)
    return out


WHERE = {"profile": "TaskProfile", "request": "ScoringRequest", "plan": "PruningPlan", "spec": "CompactModelSpec",
         "report": "ImportanceReport"}


def _reencoded(name: str, out):
    """An accepted message, encoded again and decoded: it must come back equal (encoders validate too)."""
    if name == "profile":
        return wire.decode_profile(wire.encode_profile(out, limits=SMALL), limits=SMALL)
    if name == "request":
        return wire.decode_request(wire.encode_request(out, limits=SMALL), limits=SMALL)
    if name == "plan":
        return wire.decode_plan(wire.encode_plan(out, limits=SMALL), limits=SMALL)
    if name == "spec":
        return wire.decode_spec(wire.encode_spec(out, limits=SMALL), limits=SMALL)
    header, arrays = wire.encode_report(out, "float32", limits=SMALL)  # decoded scores are float32
    return wire.decode_report(header, arrays, group_sizes=GROUPS, limits=SMALL)


def _accepts_or_rejects(name: str, data: bytes, arrays=None, *, valid: bool | None = None):
    """Decode; the outcome must be a validated message or a ValidationError naming the message. With
    `valid` known (True / False), the decoder must accept / reject. Returns the message or None."""
    try:
        out = _decode(name, data, arrays)
    except ValidationError as e:
        assert str(e).startswith(WHERE[name]), e  # always a reason, naming the message
        assert valid is not True, f"valid {name} rejected: {e}"
        return None
    assert valid is not False, f"invalid {name} accepted: {out!r:.300}"
    assert _reencoded(name, out) == out
    return out


@pytest.mark.parametrize("name", sorted(VALID_BYTES))
def test_valid_messages_are_accepted_and_equal_to_what_was_sent(name):
    sent = {"profile": PROFILE, "request": REQUEST, "plan": make_plan(), "spec": make_spec(), "report": make_report()}
    arrays = wire.encode_report(make_report())[1] if name == "report" else None
    assert _accepts_or_rejects(name, VALID_BYTES[name], arrays, valid=True) == sent[name]
    if name == "profile":  # with a latency budget and the device's table
        assert _accepts_or_rejects(name, LATENCY_PROFILE_BYTES, valid=True) == LATENCY_PROFILE
        assert _accepts_or_rejects(name, MEMORY_PROFILE_BYTES, valid=True) == MEMORY_PROFILE  # a size in bytes


def test_the_oracle_checks_catch_a_decoder_that_rejects_or_accepts_everything(monkeypatch):
    """The harness itself can fail: a decoder that rejects everything fails on valid input, one that accepts
    everything fails on invalid input."""

    def reject(*args, **kwargs):
        raise ValidationError("ScoringRequest: no")

    with monkeypatch.context() as m:
        m.setattr(wire, "decode_request", reject)
        with pytest.raises(AssertionError, match="valid request rejected"):
            _accepts_or_rejects("request", VALID_BYTES["request"], valid=True)
    with monkeypatch.context() as m:
        m.setattr(wire, "decode_request", lambda data, **kw: REQUEST)
        with pytest.raises(AssertionError, match="invalid request accepted"):
            _accepts_or_rejects("request", b"garbage", valid=False)


@FUZZ
@given(name=st.sampled_from(sorted(VALID_BYTES)), data=st.binary(max_size=512))
def test_random_bytes(name, data):
    _accepts_or_rejects(name, data)


@st.composite
def mutated(draw, name: str) -> bytes:
    """A valid encoding with a few bytes flipped, cut or inserted: near-valid garbage."""
    data = bytearray(VALID_BYTES[name])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@FUZZ
@given(data=st.data(), name=st.sampled_from(sorted(VALID_BYTES)))
def test_mutated_valid_bytes(data, name):
    _accepts_or_rejects(name, data.draw(mutated(name)))


# ----------------------------------------------------- structurally plausible, semantically random


# A valid message with 0-3 of its fields set to random values, valid or not: often accepted, and
# each rejection path (not just the first check in a decoder) gets exercised.

names = st.sampled_from(["seg", "depth", "normals", "", "seg/x", "1bad", "x" * 300])
any_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, -1.0, -0.0, 1.5, 5e-324,
                                                                            1.0000000000000002, 3.0])
int32 = st.integers(-(2**31), 2**31 - 1)
text = st.sampled_from(["", "d1", "x" * 300]) | st.text(max_size=6)
sha = st.sampled_from([SHA, "", "zz", SHA.upper(), SHA[:-1], hashlib.sha256(b"x").hexdigest()])


def put(path: str, values: st.SearchStrategy):
    """An edit that sets one (possibly nested, dotted) scalar field."""

    def edit(msg, draw) -> None:
        *parents, leaf = path.split(".")
        for part in parents:
            msg = getattr(msg, part)
        setattr(msg, leaf, draw(values))

    return edit


def replace(field: str, values: st.SearchStrategy):
    """An edit that replaces a repeated field or updates a map field."""

    def edit(msg, draw) -> None:
        value = draw(values)
        if isinstance(value, dict):
            getattr(msg, field).update(value)
        else:
            msg.ClearField(field)
            getattr(msg, field).extend(value)

    return edit


def clear(field: str):
    return lambda msg, draw: msg.ClearField(field)


def inside(path: str, edit):
    """`edit` applied to a nested message: 'budget.latency_table' or 'budget.latency_table.layers[1]'
    (a repeated entry that is not there: nothing happens)."""

    def apply(msg, draw) -> None:
        for part in path.split("."):
            name, _, index = part.partition("[")
            msg = getattr(msg, name)
            if index:
                i = int(index[:-1])
                if i >= len(msg):
                    return
                msg = msg[i]
        edit(msg, draw)

    return apply


counts = st.lists(st.integers(0, 2**32 - 1) | st.integers(1, 40), max_size=7)
TPATH = "budget.latency_table"
TABLE_EDITS = [
    put("budget.milliseconds", any_float),
    inside("budget", clear("latency_table")),
    put(f"{TPATH}.format", st.sampled_from(["cut-fl-latency/1", "", "cut-fl-latency/2"])),
    put(f"{TPATH}.base_model_sha256", sha),
    inside(TPATH, replace("tasks", st.lists(names, max_size=3))),
    inside(TPATH, replace("input_size", st.lists(st.integers(0, 2**32 - 1) | st.integers(1, 99), max_size=3))),
    put(f"{TPATH}.runtime", text),
    put(f"{TPATH}.threads", st.integers(0, 2**32 - 1) | st.integers(0, 4)),
    put(f"{TPATH}.round_to", st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 3, 8, 16, 32, 64])),
    put(f"{TPATH}.dense_ms", any_float),
    inside(f"{TPATH}.calibration[0]", put("sum_ms", any_float)),
    inside(f"{TPATH}.calibration[1]", put("measured_ms", any_float)),
    inside(TPATH, clear("calibration")),
    inside(TPATH, clear("layers")),
    inside(f"{TPATH}.layers[0]", put("name", st.sampled_from(["", "heads.seg.0", "x" * 300, "a\nb"]))),
    inside(f"{TPATH}.layers[1]", replace("cin", counts)),
    inside(f"{TPATH}.layers[0]", replace("cout", counts)),
    inside(f"{TPATH}.layers[1]", replace("us", st.lists(any_float, max_size=5))),
]


COMMON = [put("protocol_version", st.integers(0, 2**32 - 1)), replace("tasks", st.lists(names, max_size=4))]
PROFILE_EDITS = COMMON + [
    put("device_id", text),
    put("device_class", text),
    put("budget.kind", st.integers(0, 2**31 - 1)),
    put("budget.value", any_float),
    clear("budget"),
    replace("task_priority", st.dictionaries(names, any_float, max_size=3)),
    replace("samples_per_task", st.dictionaries(names, st.integers(-(2**63), 2**63 - 1), max_size=3)),
    put("budget.memory_bytes", any_float | st.sampled_from([3e6, 1e15, 1.0000000000000002e15, 0.99])),
    *TABLE_EDITS,
]
REQUEST_EDITS = COMMON + [
    put("base_model_id", text),
    put("base_model_sha256", sha),
    put("criterion", text),
    put("num_batches", st.integers(0, 2**32 - 1)),
    put("batch_size", st.integers(0, 2**32 - 1)),
    put("privacy.clip_norm", any_float),
    put("privacy.noise_multiplier", any_float),
    clear("privacy"),
]
GROUP_EDITS = [put("name", st.sampled_from(["", "g2", "heads.seg.0", "x" * 300])), put("size", int32)]
PLAN_EDITS = COMMON + [
    put("base_model_sha256", sha),
    put("budget_kind", st.integers(0, 2**31 - 1)),
    put("budget_value", any_float),
    put("method", text),
    put("plan_format_version", st.integers(0, 2**32 - 1)),
    put("plan_hash", st.sampled_from(["", "0" * 64])),
    replace("achieved", st.dictionaries(names, any_float, max_size=2)),
    clear("groups"),
]
SPEC_EDITS = COMMON + [
    put("architecture_json", st.sampled_from(["{", "[]", '{"x": Infinity}', "", "null", '{"a": [1, 2]}'])),
    put("weights_sha256", sha),
    replace("expected_metrics", st.dictionaries(names, any_float, max_size=2)),
    clear("plan"),
]


def _apply(draw, msg, edits) -> None:
    for i in draw(st.lists(st.integers(0, len(edits) - 1), max_size=3)):
        edits[i](msg, draw)


@st.composite
def edited_plan(draw, msg: pb.PruningPlan) -> None:
    """Edit a plan, its groups and kept indices; mostly re-sign it so the hash check passes."""
    _apply(draw, msg, PLAN_EDITS)
    for group in msg.groups:
        if draw(st.integers(0, 3)) == 0:
            _apply(draw, group, GROUP_EDITS + [replace("keep", st.lists(int32 | st.integers(-1, 8), max_size=5))])
    if draw(st.integers(0, 3)) > 0:
        try:
            plan = PruningPlan(
                base_model_sha256=msg.base_model_sha256,
                tasks=tuple(msg.tasks),
                keep={g.name: tuple(g.keep) for g in msg.groups},
                group_sizes={g.name: g.size for g in msg.groups},
                version=msg.plan_format_version,
            )
            msg.plan_hash = plan.plan_hash
        except (ValueError, IndexError):
            pass


@st.composite
def edited(draw, name: str) -> bytes:
    cls = {"profile": pb.TaskProfile, "request": pb.ScoringRequest, "plan": pb.PruningPlan, "spec": pb.CompactModelSpec}
    msg = cls[name].FromString(VALID_BYTES[name])
    if name == "plan":
        draw(edited_plan(msg))
    elif name == "spec":
        _apply(draw, msg, SPEC_EDITS)
        draw(edited_plan(msg.plan))
    else:
        if name == "profile":
            start = draw(st.sampled_from([VALID_BYTES[name], LATENCY_PROFILE_BYTES, MEMORY_PROFILE_BYTES]))
            msg = pb.TaskProfile.FromString(start)
        _apply(draw, msg, PROFILE_EDITS if name == "profile" else REQUEST_EDITS)
    return msg.SerializeToString()


# The contract's rules, restated independently of cut.messages, on the final protobuf message.
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _name_ok(value: str) -> bool:
    return 0 < len(value) <= 256 and value.isprintable()


def _tasks_ok(tasks) -> bool:
    tasks = list(tasks)
    return (0 < len(tasks) <= 64 and len(set(tasks)) == len(tasks)
            and all(t.isidentifier() and len(t) <= 256 for t in tasks))


def _non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _increasing(values) -> bool:
    values = list(values)
    return 1 <= len(values) <= 6 and all(v >= 1 for v in values) and all(a < b for a, b in zip(values, values[1:], strict=False))


def _latency_table_ok(t: pb.LatencyTable, tasks: set[str]) -> bool:
    """cut.latency's table rules, restated: format, bounds, increasing grids, finite times, names."""
    positive = [p.sum_ms for p in t.calibration] + [p.measured_ms for p in t.calibration] + [t.dense_ms]
    sums = [p.sum_ms for p in t.calibration]
    layers_ok = all(_name_ok(x.name) and _increasing(x.cin) and _increasing(x.cout)
                    and len(x.us) == len(x.cin) * len(x.cout) and all(math.isfinite(u) and 0 <= u < 1e9 for u in x.us)
                    for x in t.layers)
    return (t.format == "cut-fl-latency/1" and bool(_SHA256.fullmatch(t.base_model_sha256))
            and _tasks_ok(t.tasks) and set(t.tasks) == tasks
            and len(t.input_size) == 2 and all(1 <= v <= 65536 for v in t.input_size)
            and _name_ok(t.runtime) and 1 <= t.threads <= 1024 and t.round_to in (1, 2, 4, 8, 16, 32)
            and 1 <= len(t.calibration) <= 6 and all(math.isfinite(v) and 0 < v < 1e7 for v in positive)
            and all(a < b for a, b in zip(sums, sums[1:], strict=False))
            and 1 <= len(t.layers) <= 4096 and len({x.name for x in t.layers}) == len(t.layers) and layers_ok)


def _budget_ok(b: pb.Budget, tasks: set[str]) -> bool:
    ms, nbytes = b.milliseconds, b.memory_bytes
    if not (b.kind in (1, 2, 3, 4) and math.isfinite(b.value) and 0 < b.value <= 1 and math.isfinite(ms)
            and 0 <= ms < 1e7 and math.isfinite(nbytes) and (nbytes == 0 or 1 <= nbytes <= 1e15)):
        return False
    if nbytes and b.kind != 4:  # bytes belong to a memory budget only
        return False
    if b.kind != 3:  # milliseconds and a table belong to a latency budget only
        return ms == 0 and not b.HasField("latency_table")
    return b.HasField("latency_table") and _latency_table_ok(b.latency_table, tasks)


def profile_is_valid(msg: pb.TaskProfile) -> bool:
    tasks = set(msg.tasks)
    return (msg.protocol_version == 1 and _name_ok(msg.device_id)
            and len(msg.device_class) <= 256 and msg.device_class.isprintable()
            and _tasks_ok(msg.tasks)
            and msg.HasField("budget") and _budget_ok(msg.budget, tasks)
            and all(k in tasks and _non_negative(v) for k, v in msg.task_priority.items())
            and all(k in tasks and v >= 0 for k, v in msg.samples_per_task.items()))


def request_is_valid(msg: pb.ScoringRequest) -> bool:
    clip, noise = msg.privacy.clip_norm, msg.privacy.noise_multiplier
    return (msg.protocol_version == 1 and _name_ok(msg.base_model_id)
            and bool(_SHA256.fullmatch(msg.base_model_sha256)) and _tasks_ok(msg.tasks) and _name_ok(msg.criterion)
            and msg.num_batches >= 1 and msg.batch_size >= 1
            and _non_negative(clip) and _non_negative(noise) and (noise == 0 or clip > 0))


ORACLES = {"profile": profile_is_valid, "request": request_is_valid}


def _check_edited(name: str, payload: bytes) -> None:
    msg = (pb.TaskProfile if name == "profile" else pb.ScoringRequest).FromString(payload)
    out = _accepts_or_rejects(name, payload, valid=ORACLES[name](msg))
    if out is not None:  # what was accepted is what was sent
        assert out.tasks == tuple(msg.tasks)
        if name == "request":
            assert (out.num_batches, out.privacy.clip_norm) == (msg.num_batches, msg.privacy.clip_norm)
        else:
            assert out.task_priority == dict(msg.task_priority) and out.budget.value == msg.budget.value


@FUZZ
@given(data=st.data(), name=st.sampled_from(["profile", "request"]))
def test_edited_profiles_and_requests_are_accepted_exactly_when_valid(data, name):
    _check_edited(name, data.draw(edited(name)))


ONE_EDIT = settings(FUZZ, max_examples=40)


@pytest.mark.parametrize(("name", "index"), [("profile", i) for i in range(len(PROFILE_EDITS))]
                         + [("request", i) for i in range(len(REQUEST_EDITS))])
@ONE_EDIT
@given(data=st.data())
def test_one_edited_field_is_accepted_exactly_when_valid(name, index, data):
    """One field at a time: a message that breaks exactly one rule is common here (with several random
    edits most messages break several rules, and a decoder that missed one rule would still reject them)."""
    msg = (pb.TaskProfile if name == "profile" else pb.ScoringRequest).FromString(VALID_BYTES[name])
    if name == "profile" and index >= len(PROFILE_EDITS) - len(TABLE_EDITS):  # the table's fields: on a latency one
        msg = pb.TaskProfile.FromString(LATENCY_PROFILE_BYTES)
    (PROFILE_EDITS if name == "profile" else REQUEST_EDITS)[index](msg, data.draw)
    _check_edited(name, msg.SerializeToString())


@FUZZ
@given(data=st.data(), name=st.sampled_from(["plan", "spec"]))
def test_edited_plans_and_specs(data, name):
    _accepts_or_rejects(name, data.draw(edited(name)))


@st.composite
def valid_plans(draw) -> PruningPlan:
    """Any plan built from valid parts: random tasks, groups, sizes and kept channels."""
    tasks = tuple(draw(st.lists(st.sampled_from(["seg", "depth", "normals", "edges"]), min_size=1, max_size=4,
                                unique=True)))
    sizes = draw(st.dictionaries(st.sampled_from(["backbone.layer1", "backbone.layer2", "heads.seg.0", "g"]),
                                 st.integers(1, 40), min_size=1))
    keep = {g: tuple(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))) for g, n in sizes.items()}
    return PruningPlan(base_model_sha256=draw(sha.filter(_SHA256.fullmatch)), tasks=tasks, keep=keep,
                       group_sizes=sizes, budget_kind=draw(st.sampled_from(["params", "macs", "memory", "latency"])),
                       budget_value=draw(st.floats(1e-6, 1.0)), method=draw(st.sampled_from(["cut", "l1", "x" * 256])),
                       achieved=draw(st.dictionaries(st.sampled_from(["params_ratio", "macs_ratio"]),
                                                     st.floats(-1e6, 1e6), max_size=2)))


@FUZZ
@given(plan=valid_plans(), metrics=st.dictionaries(st.sampled_from(["seg/miou", "delta_m"]), st.floats(-1e3, 1e3)))
def test_every_valid_plan_and_spec_is_accepted(plan, metrics):
    assert _accepts_or_rejects("plan", wire.encode_plan(plan), valid=True) == plan
    spec = CompactModelSpec(plan=plan, architecture={"backbone": "resnet18", "width": [1, 2]}, weights_sha256=SHA,
                            tasks=plan.tasks, expected_metrics=metrics)
    assert _accepts_or_rejects("spec", wire.encode_spec(spec), valid=True) == spec


# ----------------------------------------------------------------------------- report arrays


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """Valid about 3 times in 4, so that arrays often get past the first checks to deeper ones."""
    return st.one_of(good, good, good, bad)


REPORT_HEADER, REPORT_ARRAYS = wire.encode_report(make_report(), "float16")
dtypes = mostly(st.just(np.float16), st.sampled_from([np.float32, np.float64, np.int32, np.bool_]))
elements = mostly(st.floats(0.0, 100.0, width=16), st.floats(allow_nan=True, allow_infinity=True, width=16))


@st.composite
def random_vector(draw, key: str) -> object:
    """Mostly a float16 vector of the right length; sometimes wrong dtype, shape or no array at all."""
    length = REPORT_ARRAYS[key].size if key in REPORT_ARRAYS else 3
    shape = draw(mostly(st.just((length,)), st.sampled_from([(0,), (length + 1,), (2, 2), ()])))
    dtype = draw(dtypes)
    if np.dtype(dtype).kind == "f":
        return draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from([[1.0, 2.0], None, "abc", 3.0]))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def plausible_arrays(draw) -> dict:
    """The header's arrays with a few edits: values replaced (NaN, inf, negatives, wrong shape or
    dtype), keys dropped or added."""
    keys = list(REPORT_ARRAYS)
    out = dict(REPORT_ARRAYS)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(mostly(st.just("replace"), st.sampled_from(["drop", "add"])))
        key = draw(st.sampled_from(keys))
        if op == "replace":
            out[key] = draw(random_vector(key))
        elif op == "drop":
            out.pop(key, None)
        else:
            out[draw(st.sampled_from(["seg/ghost", "sky/backbone.layer1", "x", ""]))] = draw(random_vector("x"))
    return out


def arrays_are_valid(arrays: dict) -> bool:
    """The report header's contract for its arrays: exactly its keys, each a float16 1-D vector of its
    group's size, finite and non-negative."""
    if set(arrays) != set(REPORT_ARRAYS):
        return False
    for key, arr in arrays.items():
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float16 or arr.shape != REPORT_ARRAYS[key].shape:
            return False
        if not np.isfinite(arr).all() or (arr < 0).any():
            return False
    return True


@FUZZ
@given(arrays=plausible_arrays())
def test_report_with_plausible_arrays(arrays):
    out = _accepts_or_rejects("report", REPORT_HEADER, arrays, valid=arrays_are_valid(arrays))
    if out is not None:  # the server reads exactly the values the device sent
        for key, arr in arrays.items():
            task, group = key.split("/", 1)
            np.testing.assert_array_equal(out.scores[task][group], arr.astype(np.float32))


@FUZZ
@given(data=st.data())
def test_report_with_mutated_header_and_arrays(data):
    header = data.draw(mutated("report") | st.just(REPORT_HEADER))
    arrays = data.draw(plausible_arrays())
    _accepts_or_rejects("report", header, arrays)


@FUZZ
@given(
    values=hnp.arrays(np.float32, 4, elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    dtype=st.sampled_from(["float16", "float32"]),
)
def test_encode_report_never_leaks_other_errors(values, dtype):
    """Encoding random vectors either round-trips or raises ValidationError (NaN, <0, f16 overflow)."""
    scores = make_report().scores
    scores["seg"]["heads.seg.0"] = values
    report = make_report(scores=scores)
    try:
        header, arrays = wire.encode_report(report, dtype)
    except ValidationError:
        return
    back = wire.decode_report(header, arrays, group_sizes=GROUPS)
    np.testing.assert_allclose(back.scores["seg"]["heads.seg.0"], values, rtol=1e-3, atol=1e-4)
