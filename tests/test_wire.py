"""The server <-> device contract: protobuf round-trips and every validation rule.

Long because it has one test per rule of the contract.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from cut import wire
from cut.messages import (
    PROTOCOL_VERSION,
    Budget,
    CompactModelSpec,
    ImportanceReport,
    Limits,
    PrivacySettings,
    ScoringRequest,
    TaskProfile,
    ValidationError,
    validate_plan,
)
from cut.plan import PruningPlan
from cut.proto import cutfl_pb2 as pb

SHA = hashlib.sha256(b"base model").hexdigest()
OTHER_SHA = hashlib.sha256(b"another model").hexdigest()
KNOWN = ("seg", "depth", "normals")
GROUPS = {"backbone.layer1": 8, "backbone.layer2": 16, "heads.seg.0": 4}


def make_profile(**kw) -> TaskProfile:
    base = dict(
        device_id="phone-7",
        tasks=("seg", "depth"),
        budget=Budget("macs", 0.5),
        device_class="phone",
        task_priority={"seg": 2.0, "depth": 0.5},
        samples_per_task={"seg": 120, "depth": 80},
    )
    return TaskProfile(**{**base, **kw})


def make_request(**kw) -> ScoringRequest:
    base = dict(
        base_model_id="mtl-resnet18",
        base_model_sha256=SHA,
        tasks=("seg", "depth"),
        criterion="taylor",
        num_batches=4,
        batch_size=16,
        privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=0.3),
    )
    return ScoringRequest(**{**base, **kw})


def make_scores(tasks=("seg", "depth"), seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # multiples of 1/64 below 32 (11 significant bits) are exact in float16, so float16 round-trips compare exactly
    return {t: {g: (rng.integers(0, 2048, size=n) / 64).astype(np.float32) for g, n in GROUPS.items()} for t in tasks}


def make_report(**kw) -> ImportanceReport:
    base = dict(
        device_id="phone-7",
        base_model_id="mtl-resnet18",
        base_model_sha256=SHA,
        scores=make_scores(),
        samples_used={"seg": 64, "depth": 64},
    )
    return ImportanceReport(**{**base, **kw})


def make_plan(**kw) -> PruningPlan:
    base = dict(
        base_model_sha256=SHA,
        tasks=("seg", "depth"),
        keep={"backbone.layer1": (0, 2, 5), "backbone.layer2": tuple(range(0, 16, 2)), "heads.seg.0": (1, 3)},
        group_sizes=dict(GROUPS),
        budget_kind="params",
        budget_value=0.5,
        method="cut",
        achieved={"params_ratio": 0.49, "macs_ratio": 0.41},
    )
    return PruningPlan(**{**base, **kw})


def make_spec(**kw) -> CompactModelSpec:
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    base = dict(
        plan=make_plan(),
        architecture={"backbone": "resnet18", "heads": {"seg": {"num_classes": 13}, "depth": {}}, "width": [64, 128]},
        weights_sha256=wire.arrays_sha256(weights),
        tasks=("seg", "depth"),
        expected_metrics={"seg/miou": 0.41, "depth/abs_err": 0.07, "delta_m": -2.5},
    )
    return CompactModelSpec(**{**base, **kw})


# ------------------------------------------------------------------------------------ round-trips


def test_profile_round_trip():
    p = make_profile()
    assert wire.decode_profile(wire.encode_profile(p), known_tasks=KNOWN) == p


def test_profile_minimal_round_trip_and_list_tasks():
    p = TaskProfile(device_id="d", tasks=["normals"], budget=Budget("macs", 1.0))  # latency needs a table: tests/test_latency.py
    assert p.tasks == ("normals",)
    assert wire.decode_profile(wire.encode_profile(p)) == p


@pytest.mark.parametrize("privacy", [PrivacySettings(), PrivacySettings(clip_norm=2.5),
                                     PrivacySettings(clip_norm=2.5, noise_multiplier=1.1)])
def test_request_round_trip(privacy):
    r = make_request(privacy=privacy)
    back = wire.decode_request(wire.encode_request(r), known_tasks=KNOWN, base_model_sha256=SHA)
    assert back == r
    assert (back.privacy.clip_norm, back.privacy.noise_multiplier) == (privacy.clip_norm, privacy.noise_multiplier)


def test_no_dp_noise_seed_travels():
    """A server that chose the devices' noise seed could regenerate the noise and subtract it: the
    contract has no seed anywhere (field 3 of PrivacySettings is reserved), and bytes from a sender that
    still sets field 3 decode to settings without it (an unknown field, ignored)."""
    assert not any("seed" in f.name for f in pb.PrivacySettings.DESCRIPTOR.fields)
    assert 3 not in pb.PrivacySettings.DESCRIPTOR.fields_by_number
    for message in (pb.ScoringRequest, pb.TaskProfile, pb.ImportanceReport, pb.PruningPlan, pb.CompactModelSpec):
        assert not any("seed" in f.name for f in message.DESCRIPTOR.fields), message.DESCRIPTOR.name
    assert "seed" not in {f.name for f in dataclasses.fields(PrivacySettings)}
    with pytest.raises(TypeError):
        PrivacySettings(clip_norm=1.0, noise_multiplier=1.0, seed=7)  # type: ignore[call-arg]
    # A legacy sender's field 3 (varint 7): tag (3 << 3) | 0 = 0x18.
    msg = pb.ScoringRequest.FromString(wire.encode_request(make_request()))
    legacy_privacy = msg.privacy.SerializeToString() + b"\x18\x07"
    msg.ClearField("privacy")
    legacy = msg.SerializeToString() + b"\x42" + bytes([len(legacy_privacy)]) + legacy_privacy  # field 8, len
    back = wire.decode_request(legacy, known_tasks=KNOWN, base_model_sha256=SHA)
    assert back == make_request()
    assert wire.encode_request(back) == wire.encode_request(make_request())  # nothing of it is sent on


def test_request_without_privacy_block_means_no_dp():
    msg = pb.ScoringRequest(
        protocol_version=PROTOCOL_VERSION,
        base_model_id="m",
        base_model_sha256=SHA,
        tasks=["seg"],
        criterion="l1",
        num_batches=1,
        batch_size=1,
    )
    r = wire.decode_request(msg.SerializeToString())
    assert r.privacy == PrivacySettings()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_report_round_trip(dtype):
    r = make_report()
    header, arrays = wire.encode_report(r, dtype)
    assert set(arrays) == {f"{t}/{g}" for t in ("seg", "depth") for g in GROUPS}
    assert all(a.dtype == np.dtype(dtype) and a.ndim == 1 for a in arrays.values())
    back = wire.decode_report(header, arrays, known_tasks=KNOWN, group_sizes=GROUPS, base_model_sha256=SHA)
    assert back == r
    assert back.tasks == ("seg", "depth")
    assert all(v.dtype == np.float32 for g in back.scores.values() for v in g.values())


def test_report_float16_rounds_within_tolerance_and_halves_payload():
    rng = np.random.default_rng(1)
    scores = {"seg": {g: rng.random(n, dtype=np.float32) for g, n in GROUPS.items()}}
    r = make_report(scores=scores, samples_used={"seg": 10})
    h16, a16 = wire.encode_report(r, "float16")
    h32, a32 = wire.encode_report(r, "float32")
    back = wire.decode_report(h16, a16)
    for g, v in scores["seg"].items():
        np.testing.assert_allclose(back.scores["seg"][g], v, rtol=1e-3, atol=1e-4)
    data16 = wire.payload_nbytes(h16, a16) - len(h16)
    data32 = wire.payload_nbytes(h32, a32) - len(h32)
    keys = sum(len(k) for k in a16)
    assert data16 - keys == (data32 - keys) // 2 == sum(GROUPS.values()) * 2
    assert wire.payload_nbytes(h32) == len(h32)


def test_report_float16_overflow_is_refused():
    scores = make_scores()
    scores["seg"]["heads.seg.0"] = np.array([1e6, 0, 0, 0], dtype=np.float32)
    with pytest.raises(ValidationError, match="overflow float16"):
        wire.encode_report(make_report(scores=scores), "float16")
    wire.encode_report(make_report(scores=scores), "float32")  # fine in float32


def test_report_task_specific_groups():
    """A head's groups need only be scored by their own task."""
    shared = {"backbone.layer1": 8, "backbone.layer2": 16}
    scores = make_scores()
    del scores["depth"]["heads.seg.0"]
    task_groups = {"seg": list(GROUPS), "depth": list(shared)}
    r = make_report(scores=scores)
    header, arrays = wire.encode_report(r)
    assert wire.decode_report(header, arrays, group_sizes=GROUPS, task_groups=task_groups) == r
    with pytest.raises(ValidationError, match="missing score vector.*heads.seg.0"):
        wire.decode_report(header, arrays, group_sizes=GROUPS)


def test_plan_round_trip_preserves_hash():
    plan = make_plan()
    back = wire.decode_plan(wire.encode_plan(plan), known_tasks=KNOWN, base_model_sha256=SHA, group_sizes=GROUPS)
    assert back == plan
    assert back.plan_hash == plan.plan_hash
    msg = pb.PruningPlan.FromString(wire.encode_plan(plan))
    assert msg.plan_hash == plan.plan_hash


def test_plan_with_tampered_content_is_rejected():
    msg = pb.PruningPlan.FromString(wire.encode_plan(make_plan()))
    msg.groups[0].keep.append(7)
    with pytest.raises(ValidationError, match="plan hash mismatch"):
        wire.decode_plan(msg.SerializeToString())


def test_spec_round_trip_and_weights_check():
    spec = make_spec()
    back = wire.decode_spec(wire.encode_spec(spec), known_tasks=KNOWN, base_model_sha256=SHA, group_sizes=GROUPS)
    assert back == spec
    assert back.plan.plan_hash == spec.plan.plan_hash
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    wire.verify_weights(back, weights)
    weights["w"][0, 0] = 1.0
    with pytest.raises(ValidationError, match="weights sha256 mismatch"):
        wire.verify_weights(back, weights)


def test_encoding_is_deterministic():
    assert wire.encode_profile(make_profile()) == wire.encode_profile(make_profile())
    assert wire.encode_plan(make_plan()) == wire.encode_plan(make_plan())


def test_arrays_sha256_depends_on_names_dtype_and_shape():
    a = np.zeros(6, dtype=np.float32)
    digests = {
        wire.arrays_sha256({"w": a}),
        wire.arrays_sha256({"v": a}),
        wire.arrays_sha256({"w": a.reshape(2, 3)}),
        wire.arrays_sha256({"w": a.astype(np.int32)}),
    }
    assert len(digests) == 4


def test_wire_does_not_import_flwr():
    code = "import sys, cut.wire, cut.messages; assert not any(m.startswith('flwr') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- validation failures


def _replace(obj, **kw):
    return dataclasses.replace(obj, **kw)


PROFILE_CASES = [
    ({"tasks": ()}, "empty task list"),
    ({"tasks": ("seg", "seg")}, "duplicate task"),
    ({"tasks": ("seg", "sky")}, "unknown task"),
    ({"tasks": ("seg/x",)}, "identifiers"),
    ({"budget": Budget("params", 0.0)}, r"outside \(0, 1\]"),
    ({"budget": Budget("params", 1.5)}, r"outside \(0, 1\]"),
    ({"budget": Budget("params", float("nan"))}, r"outside \(0, 1\]"),
    ({"budget": Budget("energy", 0.5)}, "unknown budget kind"),
    ({"device_id": ""}, "device_id"),
    ({"protocol_version": 2}, "protocol version 2"),
    ({"task_priority": {"seg": -1.0}}, "negative"),
    ({"task_priority": {"normals": 1.0}}, "not in the task list"),
    ({"samples_per_task": {"seg": -3}}, "samples_per_task"),
]


@pytest.mark.parametrize(("change", "reason"), PROFILE_CASES)
def test_profile_validation(change, reason):
    with pytest.raises(ValidationError, match=reason):
        _replace(make_profile(), **change).validate(known_tasks=KNOWN)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"base_model_sha256": OTHER_SHA}, "base_model_sha256 mismatch"),
        ({"base_model_sha256": "abc"}, "64 lowercase hex"),
        ({"tasks": ()}, "empty task list"),
        ({"tasks": ("depth", "depth")}, "duplicate task"),
        ({"tasks": ("edges",)}, "unknown task"),
        ({"num_batches": 0}, "num_batches"),
        ({"batch_size": -1}, "batch_size"),
        ({"criterion": ""}, "criterion"),
        ({"privacy": PrivacySettings(clip_norm=0.0, noise_multiplier=1.0)}, "needs clip_norm"),
        ({"privacy": PrivacySettings(clip_norm=float("inf"))}, "clip_norm"),
        ({"protocol_version": 0}, "protocol version 0"),
    ],
)
def test_request_validation(change, reason):
    with pytest.raises(ValidationError, match=reason):
        _replace(make_request(), **change).validate(known_tasks=KNOWN, base_model_sha256=SHA)


def _scores_with(task: str, group: str, vec) -> dict:
    scores = make_scores()
    scores[task][group] = vec
    return scores


def _scores_without(task: str, group: str) -> dict:
    scores = make_scores()
    del scores[task][group]
    return scores


REPORT_CASES = [
    ({"scores": _scores_with("seg", "heads.seg.0", np.array([1, np.nan, 0, 0], np.float32))}, "NaN or inf"),
    ({"scores": _scores_with("seg", "heads.seg.0", np.array([1, np.inf, 0, 0], np.float32))}, "NaN or inf"),
    ({"scores": _scores_with("seg", "heads.seg.0", np.array([1, -2, 0, 0], np.float32))}, "negative"),
    ({"scores": _scores_with("seg", "heads.seg.0", np.ones(5, np.float32))}, "5 scores, expected 4"),
    ({"scores": _scores_with("seg", "heads.seg.0", np.ones((2, 2), np.float32))}, "1-D"),
    ({"scores": _scores_with("seg", "heads.seg.0", np.ones(4, np.int64))}, "floating"),
    ({"scores": _scores_with("seg", "heads.depth.0", np.ones(3, np.float32))}, "extra"),
    ({"scores": _scores_without("depth", "backbone.layer2")}, "missing score vector"),
    ({"scores": {}, "samples_used": {}}, "empty task list"),
    ({"scores": {"sky": make_scores()["seg"]}, "samples_used": {"sky": 1}}, "unknown task"),
    ({"samples_used": {"seg": 64}}, "samples_used names tasks"),
    ({"samples_used": {"seg": 64, "depth": -1}}, "samples_used"),
    ({"base_model_sha256": OTHER_SHA}, "base_model_sha256 mismatch"),
    ({"protocol_version": 3}, "protocol version 3"),
]


@pytest.mark.parametrize(("change", "reason"), REPORT_CASES)
def test_report_validation(change, reason):
    with pytest.raises(ValidationError, match=reason):
        _replace(make_report(), **change).validate(known_tasks=KNOWN, group_sizes=GROUPS, base_model_sha256=SHA)


def test_report_size_limit():
    with pytest.raises(ValidationError, match="too large"):
        make_report().validate(limits=Limits(max_elements=20))
    header, arrays = wire.encode_report(make_report())
    with pytest.raises(ValidationError, match="too large"):
        wire.decode_report(header, arrays, limits=Limits(max_array_bytes=100))
    with pytest.raises(ValidationError, match=r"bytes \(max 10\)"):
        wire.decode_report(header, arrays, limits=Limits(max_header_bytes=10))


def test_decode_report_checks_arrays_against_header():
    header, arrays = wire.encode_report(make_report(), "float16")
    cases = [
        ({k: v for k, v in arrays.items() if k != "seg/heads.seg.0"}, "missing score array"),
        ({**arrays, "seg/extra": np.ones(3, np.float16)}, "unexpected array"),
        ({**arrays, "seg/heads.seg.0": np.ones(4, np.float32)}, "dtype float32, the header says float16"),
        ({**arrays, "seg/heads.seg.0": [1.0, 2.0, 3.0, 4.0]}, "not a numpy array"),
        ([1, 2], "mapping"),
    ]
    for bad, reason in cases:
        with pytest.raises(ValidationError, match=reason):
            wire.decode_report(header, bad)


def test_decode_report_rejects_duplicate_tasks_and_groups():
    msg = pb.ImportanceReport.FromString(wire.encode_report(make_report())[0])
    dup_task = pb.ImportanceReport()
    dup_task.CopyFrom(msg)
    dup_task.tasks.add().CopyFrom(msg.tasks[0])
    with pytest.raises(ValidationError, match="duplicate task"):
        wire.decode_report(dup_task.SerializeToString(), {})
    dup_group = pb.ImportanceReport()
    dup_group.CopyFrom(msg)
    dup_group.tasks[0].group_names.append(msg.tasks[0].group_names[0])
    with pytest.raises(ValidationError, match="named twice"):
        wire.decode_report(dup_group.SerializeToString(), {})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"base_model_sha256": OTHER_SHA}, "base_model_sha256 mismatch"),
        ({"tasks": ()}, "empty task list"),
        ({"tasks": ("seg", "seg")}, "duplicate task"),
        ({"tasks": ("sky",)}, "unknown task"),
        ({"budget_value": 0.0}, r"outside \(0, 1\]"),
        ({"budget_value": 2.0}, r"outside \(0, 1\]"),
        ({"budget_kind": "joules"}, "unknown budget kind"),
        ({"achieved": {"params_ratio": float("nan")}}, "finite"),
        ({"keep": {"backbone.layer1": (0,)}, "group_sizes": {"backbone.layer1": 8}}, "missing group"),
        (
            {"keep": {**make_plan().keep, "x": (0,)}, "group_sizes": {**GROUPS, "x": 2}},
            r"unexpected \(extra\) group",
        ),
        (
            {"keep": {**make_plan().keep, "heads.seg.0": (0,)}, "group_sizes": {**GROUPS, "heads.seg.0": 2}},
            "has size 2, expected 4",
        ),
    ],
)
def test_plan_validation(change, reason):
    with pytest.raises(ValidationError, match=reason):
        validate_plan(_replace(make_plan(), **change), KNOWN, SHA, GROUPS)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tasks": ("depth", "seg")}, "differ from the plan's tasks"),
        ({"tasks": ()}, "empty task list"),
        ({"weights_sha256": "0" * 63}, "weights_sha256"),
        ({"architecture": {"width": (64, 128)}}, "does not survive JSON"),
        ({"architecture": {"x": float("nan")}}, "not plain JSON"),
        ({"architecture": ["resnet18"]}, "must be a dict"),
        ({"expected_metrics": {"seg/miou": float("inf")}}, "finite"),
        ({"plan": make_plan(base_model_sha256=OTHER_SHA)}, "base_model_sha256 mismatch"),
        ({"protocol_version": 99}, "protocol version 99"),
    ],
)
def test_spec_validation(change, reason):
    with pytest.raises(ValidationError, match=reason):
        _replace(make_spec(), **change).validate(known_tasks=KNOWN, base_model_sha256=SHA)


def test_encoders_refuse_invalid_messages():
    with pytest.raises(ValidationError, match="duplicate task"):
        wire.encode_profile(make_profile(tasks=("seg", "seg")))
    with pytest.raises(ValidationError, match="protocol version"):
        wire.encode_request(make_request(protocol_version=2))
    with pytest.raises(ValidationError, match="unsupported score dtype"):
        wire.encode_report(make_report(), "float64")
    with pytest.raises(ValidationError, match="negative"):
        wire.encode_report(make_report(scores=_scores_with("seg", "heads.seg.0", -np.ones(4, np.float32))))


# ----------------------------------------------------------------------------- decoding failures

DECODERS = {
    "profile": wire.decode_profile,
    "request": wire.decode_request,
    "plan": wire.decode_plan,
    "spec": wire.decode_spec,
    "report": lambda data: wire.decode_report(data, {}),
}


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"not a protobuf at all", b""])
def test_garbage_bytes_raise_validation_error(name, data):
    with pytest.raises(ValidationError):
        DECODERS[name](data)


@pytest.mark.parametrize("name", DECODERS)
def test_non_bytes_input_is_rejected(name):
    with pytest.raises(ValidationError, match="expected bytes"):
        DECODERS[name]("a string")


def test_invalid_protobuf_names_the_problem():
    with pytest.raises(ValidationError, match="not a valid TaskProfile protobuf"):
        wire.decode_profile(b"\xff\xff\xff\xff")
    with pytest.raises(ValidationError, match="protocol version 0"):
        wire.decode_profile(b"")


def test_future_protocol_version_is_rejected():
    msg = pb.TaskProfile.FromString(wire.encode_profile(make_profile()))
    msg.protocol_version = PROTOCOL_VERSION + 1
    with pytest.raises(ValidationError, match=f"protocol version {PROTOCOL_VERSION + 1} is not supported"):
        wire.decode_profile(msg.SerializeToString())


def test_decode_profile_needs_a_budget_of_a_known_kind():
    msg = pb.TaskProfile.FromString(wire.encode_profile(make_profile()))
    msg.budget.kind = 42
    with pytest.raises(ValidationError, match="unknown budget kind 42"):
        wire.decode_profile(msg.SerializeToString())
    msg.ClearField("budget")
    with pytest.raises(ValidationError, match="missing budget"):
        wire.decode_profile(msg.SerializeToString())


def test_decoders_check_context():
    with pytest.raises(ValidationError, match="unknown task"):
        wire.decode_profile(wire.encode_profile(make_profile()), known_tasks=("seg",))
    with pytest.raises(ValidationError, match="base_model_sha256 mismatch"):
        wire.decode_request(wire.encode_request(make_request()), base_model_sha256=OTHER_SHA)
    with pytest.raises(ValidationError, match="has size"):
        wire.decode_plan(wire.encode_plan(make_plan()), group_sizes={**GROUPS, "heads.seg.0": 5})
    with pytest.raises(ValidationError, match="base_model_sha256 mismatch"):
        wire.decode_spec(wire.encode_spec(make_spec()), base_model_sha256=OTHER_SHA)


def test_oversized_header_is_rejected_before_parsing():
    data = wire.encode_plan(make_plan())
    with pytest.raises(ValidationError, match=r"bytes \(max 16\)"):
        wire.decode_plan(data, limits=Limits(max_header_bytes=16))
    with pytest.raises(ValidationError, match=r"bytes \(max 16\)"):
        wire.encode_plan(make_plan(), limits=Limits(max_header_bytes=16))


def test_spec_with_bad_architecture_json_is_rejected():
    msg = pb.CompactModelSpec.FromString(wire.encode_spec(make_spec()))
    for text, reason in [("{", "not valid JSON"), ("[1]", "JSON object"), ('{"x": NaN}', "not valid JSON")]:
        msg.architecture_json = text
        with pytest.raises(ValidationError, match=reason):
            wire.decode_spec(msg.SerializeToString())
    msg.ClearField("plan")
    with pytest.raises(ValidationError, match="missing plan"):
        wire.decode_spec(msg.SerializeToString())
