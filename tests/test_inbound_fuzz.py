"""Every inbound decoding path, fuzzed: whatever a peer sends, the receiver gets a valid value or a
ValidationError that names the problem. Never a KeyError, TypeError, protobuf DecodeError or numpy error,
never a crash, never an expensive read of an oversized payload, and one bad device never stops the others.

Server side: the profile and score phase loops of server.app (their transport replaced by canned replies)
and the reply readers (report_parts + decode_device_report, check_holding, _task_metrics, and protocol.records' config_of / field /
record_arrays / metric_value / read_metrics, check_update). Device side: decode_request, the delivery
checks (store.accept_spec / receive / rebuild, wire.verify_weights) and the profile query's data spec. Flower
records are built here directly; no Flower app runs (a reply is anything with a `.content`).

Long because every inbound path has its own strategy and oracle.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server.app as server_app
from client import store
from cut import wire
from cut.checkpoint import save_model
from cut.data.scenes import scene_tasks
from cut.messages import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Budget,
    CompactModelSpec,
    ImportanceReport,
    TaskProfile,
    ValidationError,
)
from cut.models import ModelConfig, build_model
from cut.plan import PruningPlan
from cut.proto import cutfl_pb2 as pb
from protocol.phases import DataSpec, ProfileConfig
from protocol.records import (
    CONFIG,
    PROFILE_REC,
    REPORT,
    SCORES,
    arrays_record,
    build_architecture,
    config_of,
    field,
    metric_value,
    read_metrics,
    record_arrays,
    state_arrays,
)
from server.aggregate import MAX_UPDATE_RATIO, check_update
from server.ledger import REJECTED, DeviceRecord, Ledger
from server.planning import BaseModel
from server.settings import load_settings

FUZZ = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=12, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TASKS = ("seg", "depth")  # the device's tasks, in the base model's order
OTHER_SHA = hashlib.sha256(b"another model").hexdigest()
SETTINGS = load_settings("default")
W: dict = {}  # the world the strategies draw from, filled by the `world` fixture


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model (untrained), a valid report for TASKS, and a delivery that keeps every channel."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16))
    root = tmp_path_factory.mktemp("inbound")
    save_model(root / "base", model, {"dataset": "scenes"})
    base = BaseModel.load(root / "base")
    sizes, groups = base.analysis(TASKS).sizes, base.task_groups(TASKS)
    rng = np.random.default_rng(0)
    scores = {t: {g: rng.random(sizes[g]).astype(np.float32) for g in groups[t]} for t in TASKS}
    report = ImportanceReport("dev-1", base.model_id, base.sha256, scores, {t: 8 for t in TASKS})
    dense = base.decomposed(TASKS)
    plan = PruningPlan(base_model_sha256=base.sha256, tasks=TASKS, group_sizes=dict(sizes),
                       keep={g: tuple(range(n)) for g, n in sizes.items()})
    weights = state_arrays(dense)
    spec = CompactModelSpec(plan=plan, architecture=json.loads(dense.config.to_json()),
                            weights_sha256=wire.arrays_sha256(weights), tasks=TASKS)
    W.update(base=base, sizes=sizes, groups=groups, report=report, plan=plan, weights=weights, spec=spec,
             spec_bytes=wire.encode_spec(spec), profile=wire.encode_profile(TaskProfile(
                 "dev-1", TASKS, Budget("params", 0.5), "phone", samples_per_task={t: 10 for t in TASKS})))
    return W


def rejects_or_returns(call, *args, **kwargs):
    """Run one inbound path: a value, or None after a ValidationError with a reason. Anything else fails."""
    try:
        return call(*args, **kwargs)
    except ValidationError as e:
        assert str(e).strip(), "a rejection must say why"
        return None


# ---------------------------------------------------------------------------------------- strategies

names = st.sampled_from(["seg", "depth", "normals", "sky", "", "seg\n", "x" * 300, "1bad", "se/g"])
task_lists = st.lists(names, max_size=4)  # unknown, empty, duplicate and malformed task names
any_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, -1.0, 1e308])
ids = st.sampled_from(["dev-1", "dev-2", "", "x" * 300, "bad\nid", "tab\tid", "nul\x00"]) | st.text(max_size=6)


def shas():
    return st.sampled_from([W["base"].sha256, OTHER_SHA, "", "zz", W["base"].sha256.upper(), "a" * 64])


def garble(draw, data: bytes) -> bytes:
    """Usually the bytes as they are; else a few flipped, cut or inserted bytes, or random bytes."""
    how = draw(st.sampled_from(["keep", "keep", "keep", "mutate", "random"]))
    if how == "random":
        return draw(st.binary(max_size=300))
    out = bytearray(data)
    if how == "mutate":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, max(len(out) - 1, 0)))
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip" and out:
                out[i] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del out[i:i + draw(st.integers(1, 8))]
            else:
                out[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


def edits(draw, msg, options: dict) -> None:
    """Apply 0-3 edits, each setting one field of `msg` from its strategy (a callable edits in place)."""
    for key in draw(st.lists(st.sampled_from(sorted(options)), max_size=3)):
        value = options[key]
        if callable(value) and not isinstance(value, st.SearchStrategy):
            value(msg, draw)
            continue
        drawn = draw(value)
        target = getattr(msg, key)
        if isinstance(drawn, dict):
            target.clear()
            target.update(drawn)
        elif isinstance(drawn, list):
            del target[:]
            target.extend(drawn)
        else:
            setattr(msg, key, drawn)


def _budget(msg, draw) -> None:
    if draw(st.booleans()):
        msg.ClearField("budget")
    else:
        msg.budget.kind = draw(st.integers(0, 2**31 - 1) | st.sampled_from([1, 2, 3]))
        msg.budget.value = draw(any_float)


@st.composite
def profile_bytes(draw) -> bytes:
    msg = pb.TaskProfile.FromString(W["profile"])
    edits(draw, msg, {
        "protocol_version": st.integers(0, 2**32 - 1),
        "device_id": ids,
        "device_class": ids,
        "tasks": task_lists,
        "budget": _budget,
        "task_priority": st.dictionaries(names, any_float, max_size=3),
        "samples_per_task": st.dictionaries(names, st.integers(-(2**63), 2**63 - 1), max_size=3),
    })
    return garble(draw, msg.SerializeToString())


@st.composite
def config_content(draw, record: str, key: str, value) -> RecordDict:
    """A RecordDict carrying `value` under record/key, or with the record, the key or the type wrong."""
    shape = draw(st.sampled_from(["ok"] * 12 + ["no record", "no key", "str", "int", "list", "elsewhere"]))
    if shape == "no record":
        return RecordDict()
    if shape == "elsewhere":
        return RecordDict({"somewhere": ConfigRecord({key: value})})
    wrong = {"str": value.decode("latin-1") if isinstance(value, bytes) else value, "int": 7,
             "list": [value] if isinstance(value, bytes) else [1, 2]}
    fields = {} if shape == "no key" else {key: value if shape == "ok" else wrong[shape]}
    return RecordDict({record: ConfigRecord(fields)})


def npy_array(shape: tuple, descr: str, payload: bytes, stype: str = "numpy.ndarray") -> Array:
    """An Array whose npy header says `shape` and `descr`, whatever the payload really holds."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return Array(dtype="float32", shape=tuple(int(s) for s in shape), stype=stype, data=buf.getvalue() + payload)


@st.composite
def lying_array(draw) -> Array:
    """An Array whose header claims huge or odd data, or whose bytes are no npy at all."""
    if draw(st.integers(0, 4)) == 0:
        return Array(dtype="float16", shape=(3,), stype=draw(st.sampled_from(["numpy.ndarray", "torch", ""])),
                     data=draw(st.binary(max_size=64)))
    shape = draw(st.sampled_from([(2**40,), (2**62, 2**62), (2**31, 2**31, 4), (3,), (10**6,), (), (0,)]))
    descr = draw(st.sampled_from(["<f2", "<f4", "|O", "|V0", "<U3", "|b1", "<c16"]))
    payload = draw(st.binary(max_size=32))
    return npy_array(shape, descr, payload, draw(st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch"])))


def odd_vector(draw, n: int, dtype) -> np.ndarray:
    """A score vector that is wrong in one way: NaN, inf, negative, length, rank, dtype."""
    how = draw(st.sampled_from(["nan", "inf", "negative", "short", "long", "empty", "2d", "0d", "dtype", "ok"]))
    vec = np.linspace(0.0, 1.0, n).astype(dtype)
    if how in ("nan", "inf", "negative"):
        vec[draw(st.integers(0, n - 1))] = {"nan": np.nan, "inf": np.inf, "negative": -1.0}[how]
    elif how in ("short", "long", "empty"):
        vec = np.ones({"short": n - 1, "long": n + draw(st.integers(1, 1000)), "empty": 0}[how], dtype)
    elif how == "2d":
        vec = np.ones((1, n), dtype)
    elif how == "0d":
        vec = np.array(1.0, dtype)
    elif how == "dtype":
        vec = vec.astype(draw(st.sampled_from([np.float64, np.int32, np.bool_, np.uint8, "<U2"])))
    return vec


@st.composite
def report_payload(draw) -> tuple[bytes, dict[str, np.ndarray]]:
    """A valid report's header and arrays with edits: header fields (device, base model sha, tasks,
    groups, dtype, version) and score vectors (NaN, inf, negative, lengths, dtypes, keys)."""
    report = W["report"]
    dtype = draw(st.sampled_from(["float16", "float32"]))
    header, arrays = wire.encode_report(report, dtype)
    msg = pb.ImportanceReport.FromString(header)

    def _tasks(m, draw) -> None:
        entry = m.tasks[draw(st.integers(0, len(m.tasks) - 1))]
        what = draw(st.sampled_from(["task", "samples", "drop group", "dup group", "ghost group", "drop task"]))
        if what == "task":
            entry.task = draw(names)
        elif what == "samples":
            entry.samples_used = draw(st.integers(-(2**63), 2**63 - 1))
        elif what == "drop group" and entry.group_names:
            del entry.group_names[0]
        elif what == "dup group" and entry.group_names:
            entry.group_names.append(entry.group_names[0])
        elif what == "ghost group":
            entry.group_names.append(draw(st.sampled_from(["ghost", "", "g\n"])))
        elif what == "drop task":
            del m.tasks[0]

    edits(draw, msg, {
        "protocol_version": st.integers(0, 2**32 - 1),
        "device_id": ids,
        "base_model_sha256": shas(),
        "dtype": st.integers(0, 5),
        "tasks": _tasks,
    })
    header = garble(draw, msg.SerializeToString())
    original, arrays = arrays, dict(arrays)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(original)))
        op = draw(st.sampled_from(["odd", "odd", "drop", "add"]))
        if op == "odd":
            arrays[key] = odd_vector(draw, len(original[key]), np.dtype(dtype))
        elif op == "drop":
            arrays.pop(key, None)
        else:
            arrays[draw(st.sampled_from(["seg/ghost", "sky/" + key.split("/", 1)[1], "x", "seg/"]))] = original[key]
    return header, arrays


@st.composite
def score_content(draw) -> RecordDict:
    header, arrays = draw(report_payload())
    content = draw(config_content(REPORT, "header", header))
    shape = draw(st.sampled_from(["arrays", "arrays", "arrays", "none", "lying", "elsewhere"]))
    if shape == "arrays":
        content[SCORES] = arrays_record(arrays)
    elif shape == "lying":
        record = arrays_record(arrays)
        record[draw(st.sampled_from(sorted(arrays) + ["extra"]))] = draw(lying_array())
        content[SCORES] = record
    elif shape == "elsewhere":
        content["other"] = arrays_record(arrays)
    return content


# ------------------------------------------------------------------------------ server: phase loops


def run_phase(phase, replies: dict[int, RecordDict], setup=None) -> Ledger:
    """One server phase with the transport replaced by `replies` (node id -> reply content)."""
    ledger = Ledger(sorted(replies))
    if setup:
        setup(ledger)
    canned = {node: SimpleNamespace(content=content) for node, content in replies.items()}
    with mock.patch.object(server_app, "exchange", return_value=canned), \
            mock.patch.object(server_app, "score_content_factory", return_value=lambda record: RecordDict()):
        phase(None, ledger, SETTINGS, W["base"])
    return ledger


def check_ledger(ledger: Ledger, phase: str) -> None:
    """Node 1 sent a valid reply and goes on; every other node goes on or is rejected with a reason."""
    assert ledger.records[1].ok, ledger.records[1].reason
    for record in ledger:
        assert record.ok or (record.status == REJECTED and record.reason.startswith(f"{phase}: ")), record
        assert record.ok or len(record.reason) > len(phase) + 2


@FEW
@given(data=st.data())
def test_profile_phase_survives_any_profile_reply(world, data):
    bad = data.draw(st.lists(profile_bytes().flatmap(lambda b: config_content(PROFILE_REC, "data", b)),
                             min_size=1, max_size=4))
    replies = {1: RecordDict({PROFILE_REC: ConfigRecord({"data": world["profile"]})})}
    replies.update({n: content for n, content in enumerate(bad, start=2)})
    ledger = run_phase(server_app.collect_profiles, replies)
    check_ledger(ledger, "profile")
    ok = [r for r in ledger if r.ok]
    assert len({r.device_id for r in ok}) == len(ok)  # device ids stay unique
    for r in ok:
        assert r.profile is not None and r.tasks and set(r.tasks) <= set(world["base"].task_names)


def _scoring_devices(ledger: Ledger) -> None:
    for r in ledger:
        r.device_id, r.tasks = ("dev-1" if r.node_id == 1 else f"dev-{r.node_id}"), TASKS
        r.profile = TaskProfile(r.device_id, TASKS, Budget("params", 0.5), samples_per_task={t: 10 for t in TASKS})


@FEW
@given(data=st.data())
def test_score_phase_survives_any_score_reply(world, data):
    bad = data.draw(st.lists(score_content(), min_size=1, max_size=3))
    header, arrays = wire.encode_report(world["report"], "float16")
    replies = {1: RecordDict({REPORT: ConfigRecord({"header": header}), SCORES: arrays_record(arrays)})}
    replies.update({n: content for n, content in enumerate(bad, start=2)})
    ledger = run_phase(server_app.collect_scores, replies, _scoring_devices)
    check_ledger(ledger, "score")
    for r in ledger:
        if r.ok:
            assert r.report is not None and set(r.report.tasks) == set(TASKS)


# ----------------------------------------------------------------------------- server: reply readers


def read_score_reply(content: RecordDict, record: DeviceRecord, base: BaseModel) -> ImportanceReport:
    """What the score phase does with one reply (server.app)."""
    header, arrays = server_app.report_parts(content)
    return server_app.decode_device_report(header, arrays, record, base)


@FUZZ
@given(data=st.data())
def test_read_report_accepts_only_valid_reports(world, data):
    content = data.draw(score_content())
    record = DeviceRecord(1, device_id="dev-1", tasks=TASKS)
    report = rejects_or_returns(read_score_reply, content, record, world["base"])
    if report is not None:
        assert report.device_id == "dev-1" and report.base_model_sha256 == world["base"].sha256
        for task in TASKS:
            assert set(report.scores[task]) == set(world["groups"][task])
            for group, vec in report.scores[task].items():
                assert vec.shape == (world["sizes"][group],) and np.isfinite(vec).all() and (vec >= 0).all()


@FUZZ
@given(data=st.data())
def test_decode_report_with_any_arrays_mapping(world, data):
    """Arrays as a caller might pass them: also non-arrays, non-str keys and huge (broadcast) shapes."""
    header, arrays = data.draw(report_payload())
    arrays = dict(arrays)
    key = data.draw(st.sampled_from(sorted(arrays) or ["seg/x"]))
    arrays[key] = data.draw(st.sampled_from([
        None, [1.0, 2.0], "abc", np.broadcast_to(np.float16(1), (2**40,)), np.empty(3, dtype=object),
        np.broadcast_to(np.float32(1), (2**20, 2**20)), arrays.get(key, np.ones(3, np.float16))]))
    if data.draw(st.integers(0, 9)) == 0:
        arrays = data.draw(st.sampled_from([{1: np.ones(3)}, [np.ones(3)], None, "arrays"]))
    limits = wire.report_limits(TASKS, world["sizes"], world["groups"])
    for lim in (limits, DEFAULT_LIMITS):
        rejects_or_returns(wire.decode_report, header, arrays, known_tasks=TASKS, group_sizes=world["sizes"],
                           task_groups=world["groups"], base_model_sha256=world["base"].sha256, limits=lim)


@FUZZ
@given(data=st.data())
def test_record_arrays_never_trusts_npy_headers(world, data):
    record = ArrayRecord()
    for i in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            record[f"a{i}"] = data.draw(lying_array())
        else:
            record[f"a{i}"] = Array(np.arange(data.draw(st.integers(0, 8)), dtype=np.float32))
    limits = data.draw(st.sampled_from([DEFAULT_LIMITS, wire.report_limits(TASKS, world["sizes"])]))
    out = rejects_or_returns(record_arrays, record, "fuzz", limits)
    if out is not None:
        assert set(out) == set(record) and all(isinstance(a, np.ndarray) for a in out.values())
        assert sum(a.nbytes for a in out.values()) <= limits.max_array_bytes


def test_record_arrays_refuses_oversized_before_reading(world):
    # A header that claims a terabyte: numpy would try to allocate it before noticing the bytes are missing.
    with pytest.raises(ValidationError, match="declares"):
        record_arrays(ArrayRecord({"x": npy_array((2**40,), "<f4", b"\0" * 8)}), "scores")
    # An honest but bloated upload is refused by size alone, given the limits of what was asked for.
    limits = wire.report_limits(TASKS, world["sizes"], world["groups"])
    assert limits.max_array_bytes == 4 * sum(world["sizes"][g] for t in TASKS for g in world["groups"][t])
    big = ArrayRecord({"seg/x": Array(np.zeros(limits.max_array_bytes, np.float16))})
    with pytest.raises(ValidationError, match="too large"):
        record_arrays(big, "ImportanceReport", limits)
    many = ArrayRecord({f"seg/{i}": Array(np.zeros(1, np.float16)) for i in range(limits.max_arrays + 1)})
    with pytest.raises(ValidationError, match="arrays"):
        record_arrays(many, "ImportanceReport", limits)
    header, arrays = wire.encode_report(world["report"], "float32")
    assert record_arrays(arrays_record(arrays), "ImportanceReport", limits).keys() == arrays.keys()


metric_values = any_float | st.integers(-(2**63), 2**63 - 1) | st.lists(st.floats(0, 1), max_size=2)
metric_keys = st.sampled_from(["compact/seg/miou", "compact/depth/abs_err", "dense/seg/miou", "compact/",
                               "compact//x", "compact/sky/a", "compact/seg/", "compact/se\ng/x", "params",
                               "compact/seg/" + "m" * 300, "eval_samples"])


@st.composite
def metric_record(draw) -> MetricRecord | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    values = draw(st.dictionaries(metric_keys, metric_values, max_size=6))
    if draw(st.integers(0, 9)) == 0:  # a huge metric dict
        values.update({f"compact/seg/m{i}": 1.0 for i in range(5000)})
    return MetricRecord(values)


@FUZZ
@given(metrics=metric_record(), key=metric_keys)
def test_metric_readers(metrics, key):
    record = DeviceRecord(1, device_id="dev-1", tasks=TASKS)
    got = rejects_or_returns(server_app._task_metrics, metrics, "compact", record)
    if got is not None:
        assert set(got) == set(TASKS) and all(isinstance(v, float) for m in got.values() for v in m.values())
    rejects_or_returns(read_metrics, metrics, "dense")
    value = rejects_or_returns(metric_value, metrics, key, "evaluate reply")
    assert value is None or (np.isfinite(value) and value >= 0)


SENT_SHA = "0" * 64  # the build's weights the server sent
HOLD_SHA = "1" * 64  # what a device may hold after adapting them (local BatchNorm re-estimation)


@st.composite
def holding_content(draw) -> RecordDict:
    """A device's 'what I hold' reply: the two sha256 fields, each missing, of another type or odd; about
    half the time a valid one (so both outcomes are common)."""
    odd = (st.sampled_from(["", "x" * 10_000, "A" * 64, "0" * 63, "g" * 64, "0" * 65]) | ids | st.binary(max_size=4)
           | st.integers() | st.just(SENT_SHA.encode()))
    received = st.one_of(st.just(SENT_SHA), st.just(SENT_SHA), st.just(HOLD_SHA), odd)
    held = st.one_of(st.just(SENT_SHA), st.just(HOLD_SHA), st.just("ab" * 32), odd)
    fields = draw(st.fixed_dictionaries({"received_sha256": received, "weights_sha256": held})
                  | st.fixed_dictionaries({}, optional={"received_sha256": received, "weights_sha256": held}))
    record = draw(st.sampled_from([CONFIG, CONFIG, CONFIG, "elsewhere"]))
    return RecordDict({record: ConfigRecord(fields)})


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@FUZZ
@given(content=holding_content())
def test_check_holding_accepts_exactly_an_adoption_of_the_sent_weights(content):
    """The device must say it received exactly the build's weights (received_sha256 == the sent sha) and
    name what it holds as a sha256: then check_holding returns that sha; any other reply is rejected."""
    build = SimpleNamespace(weights_sha256=SENT_SHA)
    fields = content.config_records.get(CONFIG)
    valid = (fields is not None and fields.get("received_sha256") == SENT_SHA
             and _is_sha256(fields.get("weights_sha256")))
    held = rejects_or_returns(server_app.check_holding, SimpleNamespace(content=content), build, "deliver reply")
    assert (held is not None) == valid, (dict(fields or {}), held)
    if valid:
        assert held == fields["weights_sha256"]


def test_check_holding_names_what_is_wrong():
    build = SimpleNamespace(weights_sha256=SENT_SHA)

    def reply(**fields):
        return SimpleNamespace(content=RecordDict({CONFIG: ConfigRecord(fields)}))

    assert server_app.check_holding(reply(received_sha256=SENT_SHA, weights_sha256=HOLD_SHA), build, "w") == HOLD_SHA
    with pytest.raises(ValidationError, match="adopted weights 111111111111..., not 000000000000"):
        server_app.check_holding(reply(received_sha256=HOLD_SHA, weights_sha256=HOLD_SHA), build, "w")
    with pytest.raises(ValidationError, match="missing field 'weights_sha256'"):
        server_app.check_holding(reply(received_sha256=SENT_SHA), build, "w")
    with pytest.raises(ValidationError, match="64 lowercase hex"):
        server_app.check_holding(reply(received_sha256=SENT_SHA, weights_sha256="A" * 64), build, "w")
    with pytest.raises(ValidationError, match="missing config record"):
        server_app.check_holding(SimpleNamespace(content=RecordDict()), build, "w")


@FUZZ
@given(data=st.data())
def test_finetune_update(world, data):
    """record_arrays (bounded by the plan's own weights) then check_update: a reason, never an exception."""
    reference = {k: v for k, v in list(world["weights"].items())[:6]}
    record = arrays_record(reference)
    for _ in range(data.draw(st.integers(0, 3))):
        name = data.draw(st.sampled_from(sorted(reference) + ["extra"]))
        how = data.draw(st.sampled_from(["lying", "odd", "drop"]))
        if how == "lying":
            record[name] = data.draw(lying_array())
        elif how == "odd":
            n = int(np.asarray(reference.get(name, np.ones(2))).size) or 1
            record[name] = Array(np.ascontiguousarray(odd_vector(data.draw, max(n, 1), np.float32)))
        elif name in record:
            del record[name]
    arrays = rejects_or_returns(record_arrays, record, "finetune update", wire.arrays_limits(reference))
    if arrays is None:
        return
    # An update can be averaged exactly when it has the reference's arrays, shapes and dtypes, all finite.
    usable = set(arrays) == set(reference) and all(
        arrays[k].shape == np.shape(v) and arrays[k].dtype == np.asarray(v).dtype
        and (arrays[k].dtype.kind != "f" or np.isfinite(arrays[k]).all()) for k, v in reference.items())
    if usable:  # ... and it moves the float weights (BN statistics aside) by at most MAX_UPDATE_RATIO of their norm
        floats = [k for k, v in reference.items() if np.asarray(v).dtype.kind == "f" and "running_" not in k]
        norm = np.sqrt(sum(np.sum(np.square(np.asarray(reference[k], np.float64))) for k in floats))
        change = np.sqrt(sum(np.sum(np.square(arrays[k].astype(np.float64) - reference[k])) for k in floats))
        usable = not (norm > 0 and change > MAX_UPDATE_RATIO * norm)
    reason = check_update(arrays, reference)
    assert isinstance(reason, str)
    assert (reason == "") == usable, (reason, {k: (a.dtype, a.shape) for k, a in arrays.items()})


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda a: a, ""),
    (lambda a: {k: v for k, v in list(a.items())[1:]}, "missing ['"),
    (lambda a: {**a, "extra": np.ones(2, np.float32)}, "extra ['extra']"),
    (lambda a: {**a, "w": np.ones((3, 2), np.float32)}, "is float32[3, 2], expected float32[2, 3]"),
    (lambda a: {**a, "w": np.ones((2, 3), np.float64)}, "is float64[2, 3], expected float32[2, 3]"),
    (lambda a: {**a, "w": np.array([[1, 2, np.nan], [0, 0, 0]], np.float32)}, "'w' holds NaN or inf"),
    (lambda a: {**a, "b": np.array([np.inf], np.float32)}, "'b' holds NaN or inf"),
])
def test_check_update_reasons(change, fragment):
    reference = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.float32), "n": np.array(4, np.int64)}
    reason = check_update(change(dict(reference)), reference)
    assert (reason == "") == (fragment == "") and fragment in reason, reason


# -------------------------------------------------------------------------------------- device side


@st.composite
def request_bytes(draw) -> bytes:
    msg = pb.ScoringRequest(protocol_version=PROTOCOL_VERSION, base_model_id="m", base_model_sha256=OTHER_SHA,
                            tasks=list(TASKS), criterion="fisher", num_batches=2, batch_size=4)
    edits(draw, msg, {
        "protocol_version": st.integers(0, 2**32 - 1), "base_model_id": ids, "base_model_sha256": shas(),
        "tasks": task_lists, "criterion": ids, "num_batches": st.integers(0, 2**32 - 1),
        "batch_size": st.integers(0, 2**32 - 1),
    })
    return garble(draw, msg.SerializeToString())


@FUZZ
@given(data=st.data())
def test_scoring_request_on_the_device(world, data):
    content = data.draw(request_bytes().flatmap(lambda b: config_content("request", "data", b)))

    def decode(c):
        return wire.decode_request(field(config_of(c, "request"), "data", bytes, "request"), known_tasks=TASKS)

    request = rejects_or_returns(decode, content)
    assert request is None or (set(request.tasks) <= set(TASKS) and request.num_batches >= 1)


@st.composite
def spec_bytes(draw) -> bytes:
    msg = pb.CompactModelSpec.FromString(W["spec_bytes"])

    def _plan(m, draw) -> None:
        edits(draw, m.plan, {"base_model_sha256": shas(), "tasks": task_lists, "plan_hash": shas(),
                             "budget_value": any_float, "plan_format_version": st.integers(0, 3)})

    edits(draw, msg, {
        "protocol_version": st.integers(0, 2**32 - 1), "weights_sha256": shas(), "tasks": task_lists,
        "architecture_json": st.sampled_from(["{", "[]", '{"x": Infinity}', "", "null", '{"a": [1, 2]}']),
        "expected_metrics": st.dictionaries(names, any_float, max_size=2), "plan": _plan,
    })
    return garble(draw, msg.SerializeToString())


@FUZZ
@given(data=st.data())
def test_delivery_checks(world, data):
    """accept_spec (base model, tasks), verify_weights and receive: wrong base model, tasks or weights."""
    spec_data = data.draw(spec_bytes())
    tasks = data.draw(st.sampled_from([TASKS, TASKS[::-1], ("seg",), ("seg", "depth", "normals")]))
    base_sha = data.draw(st.sampled_from([world["base"].sha256, OTHER_SHA]))
    spec = rejects_or_returns(store.accept_spec, spec_data, tasks, base_sha)
    if spec is not None:
        assert spec.plan.base_model_sha256 == base_sha and set(spec.tasks) == set(tasks)
    weights = dict(world["weights"])
    key = data.draw(st.sampled_from(sorted(weights)))
    weights[key] = data.draw(st.sampled_from([weights[key], weights[key] + 1, None, "x", weights[key].reshape(-1)[:1]]))
    rejects_or_returns(wire.verify_weights, world["spec"], weights)
    rejects_or_returns(wire.verify_weights, data.draw(st.sampled_from([world["spec"], None])), weights)
    if data.draw(st.integers(0, 4)) == 0:  # the whole delivery (rebuilds the model when all is well)
        rejects_or_returns(store.receive, spec_data, weights, tasks, base_sha)


architectures = st.sampled_from([
    {"width": -1.0}, {"width": "x"}, {"width": 1e9}, {"width": 200.0}, {"head_hidden": -3}, {"tasks": []},
    {"tasks": [{"name": "seg"}]}, {"backbone": "vgg"}, {"unknown_key": 1}, {"head_dilations": [1] * 100},
    {"in_channels": 0}, {"output_stride": 3}, {"tasks": "seg"}, {"input_size": [1, 2, 3]}, {},
])


@FEW
@given(change=architectures, as_text=st.booleans(), data=st.data())
def test_rebuild_any_architecture_and_weights(world, change, as_text, data):
    """A delivered architecture that is bad, unbuildable or huge is refused without allocating it."""
    architecture = {**world["spec"].architecture, **change}
    if as_text:  # the arrays transport of the base model sends JSON text
        architecture = json.dumps(architecture)
    model = rejects_or_returns(build_architecture, architecture, "CompactModelSpec")
    if change == {}:
        assert model is not None
    weights = dict(world["weights"])
    key = data.draw(st.sampled_from(sorted(weights)))
    weights[key] = data.draw(st.sampled_from([weights[key], weights[key].reshape(-1)[:1], weights[key].astype("<U3"),
                                              weights[key].astype(np.complex64), np.ones(2, np.float32)]))
    if model is not None:
        rebuilt = rejects_or_returns(store.rebuild, architecture if not as_text else json.loads(architecture),
                                     world["plan"], weights)
        assert rebuilt is None or rebuilt.task_names == list(TASKS)


def test_rebuild_refuses_a_huge_architecture_without_building_it(world):
    architecture = {**world["spec"].architecture, "width": 1000.0}  # ~10^13 parameters
    with pytest.raises(ValidationError, match="parameters"):
        store.rebuild(architecture, world["plan"], world["weights"])
    model = store.rebuild(world["spec"].architecture, world["plan"], world["weights"])
    assert model.task_names == list(TASKS)


@FUZZ
@given(content=config_content(CONFIG, "data_spec", DataSpec(dataset="scenes").to_json()))
def test_profile_query_accepts_a_valid_data_spec_and_refuses_the_rest(content):
    record = content.config_records.get(CONFIG)
    value = record.get("data_spec") if record is not None else None
    if value is None:  # no record or no key: the device has no data defaults from the server
        assert ProfileConfig.from_record(record).data() is None
    elif isinstance(value, str):
        assert ProfileConfig.from_record(record).data() == DataSpec(dataset="scenes")
    else:
        with pytest.raises(ValidationError, match="data_spec"):
            ProfileConfig.from_record(record)


def test_base_arrays_with_a_bad_architecture(world, tmp_path):
    from client import base as device_base

    architecture = json.dumps({**world["spec"].architecture, "width": "x"})
    with pytest.raises(ValidationError):
        device_base.from_arrays(world["base"].sha256, TASKS, architecture, world["weights"],
                                wire.arrays_sha256(world["weights"]), tmp_path / "b")


@pytest.mark.parametrize("text", ["", "[]", "{", '{"bogus": 1}', '{"samples_per_device": "x"}', '{"alpha": -1}',
                                  '{"partition": "none"}', '{"dataset_kwargs": []}'])
def test_data_spec_decoding(text):
    with pytest.raises(ValidationError, match="data spec"):
        DataSpec.from_json(text)


def test_oversized_config_fields_are_refused():
    cfg = ConfigRecord({"data": b"\0" * (DEFAULT_LIMITS.max_header_bytes + 1)})
    with pytest.raises(ValidationError, match="long"):
        field(cfg, "data", bytes, "TaskProfile")


# ---------------------------------------------------------------------------- the reason, logged


def test_exclusion_is_logged_once_with_node_device_phase_status_and_reason(caplog):
    ledger = Ledger([7, 8])
    ledger.records[7].device_id = "cam-7"
    with caplog.at_level(logging.WARNING, logger="cutfl.server"):
        ledger.exclude(7, REJECTED, "score", "ImportanceReport: task 'seg', group 'g': scores contain NaN or inf")
        ledger.exclude(7, REJECTED, "deliver", "a second reason is not recorded")
        ledger.exclude(8, "failed", "profile", "device error:\nboom")
    lines = [r for r in caplog.records if r.name == "cutfl.server"]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)
    first, second = lines[0].getMessage(), lines[1].getMessage()
    for part in ("node 7", "cam-7", "score", "rejected", "NaN or inf"):
        assert part in first
    assert "node 8" in second and "failed" in second and "\n" not in second
    assert ledger.records[7].reason == "score: ImportanceReport: task 'seg', group 'g': scores contain NaN or inf"


def test_names_with_control_characters_are_refused():
    profile = TaskProfile("cam\n7", TASKS, Budget("params", 0.5))
    with pytest.raises(ValidationError, match="control"):
        profile.validate()
