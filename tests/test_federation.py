"""The federation end to end on Flower's simulation engine, plus the pieces it is made of.

The simulations use a tiny untrained model (width 0.125, 32x32 inputs) so they need no pre-training:
what is checked is the protocol (every device gets a model with exactly its heads, within its budget,
and reports metrics; misbehaving devices are excluded with their reason while the others complete), not
accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client import store
from client.device import device_from_node_config
from client.scoring import privatise
from cut.checkpoint import load_model, save_model
from cut.compact import compact_model
from cut.data.scenes import scene_tasks
from cut.messages import CompactModelSpec, PrivacySettings, ValidationError
from cut.models import ModelConfig, build_model, count_params
from cut.plan import PruningPlan
from cut.wire import arrays_sha256, encode_spec
from protocol.phases import DataSpec
from protocol.records import state_arrays
from server.aggregate import aggregate, check_update, fedavg, personalise
from server.settings import load_settings
from simulations.faults import FaultInjector, corrupt
from simulations.fleet import DeviceClass, FleetSpec, assign

GOOD = {0: ("seg",), 1: ("depth", "normals"), 2: ("seg", "depth", "normals"), 3: ("seg", "normals")}
BAD = {4: ("nan", "NaN"), 5: ("wrong-length", "expected"), 6: ("unknown-task", "unknown task"),
       7: ("crash", "crashed"), 8: ("bad-profile", "unknown task")}


def tiny_model_dir(root: Path, samples: int = 96, epochs: int = 2) -> Path:
    """A tiny model, trained for a few steps so that its metrics are not degenerate (e.g. mIoU 0)."""
    from cut.data import get_dataset
    from cut.train import make_loader, pretrain

    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16))
    data = get_dataset("scenes", "train", num_samples=samples, size=32, seed=0)
    pretrain(model, make_loader(data, 16, shuffle=True), None, epochs=epochs, lr=3e-3, progress=False)
    save_model(root / "base", model, {"dataset": "scenes", "dataset_kwargs": {"size": 32, "seed": 0}})
    return root / "base"


def scenario_file(root: Path, base: Path, *, transport: str = "path", rounds: int = 1, alpha: float = 0.0,
                  devices: dict[int, dict] | None = None, timeouts: str = "") -> Path:
    lines = [
        f'[scenario]\nname = "test"\ndevices = {len(devices)}\n',
        f'[model]\nbase = "{base}"\ntransport = "{transport}"\n',
        "[data]\nsamples_per_device = 16\nmin_samples = 6\n",
        "[scoring]\nnum_batches = 1\nbatch_size = 8\n",
        f"[planning]\nround_to = 4\nmin_channels = 4\npersonalisation = {alpha}\n",
        f"[finetune]\nrounds = {rounds}\nsteps = 2\nbatch_size = 8\n",
        "[evaluation]\nbatch_size = 8\n",
        f"[timeouts]\nnodes = 60\n{timeouts}",
        '[fleet]\ntasks = ["seg", "depth", "normals"]\n',
        '[[fleet.classes]]\nname = "small"\nbudget = 0.5\n',
        '[[fleet.classes]]\nname = "large"\nbudget = 0.7\n',
    ]
    for pid, fields in devices.items():
        lines.append(f"[[fleet.devices]]\nid = {pid}\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in fields.items()))
    path = root / "scenario.toml"
    path.write_text("\n".join(lines))
    return path


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from simulations.runner import run_scenario

    root = tmp_path_factory.mktemp("federation")
    base = tiny_model_dir(root)
    devices = {pid: {"tasks": list(tasks)} for pid, tasks in GOOD.items()}
    devices[3]["priority"] = {"seg": 2.0, "normals": 1.0}
    devices[0]["class"] = "small"
    devices.update({pid: {"misbehave": kind} for pid, (kind, _) in BAD.items()})
    summary = run_scenario(scenario_file(root, base, devices=devices), out_dir=root / "out")
    report = json.loads((root / "out" / "report.json").read_text())
    return summary, {d["device_id"]: d for d in report["devices"]}, root


@pytest.mark.slow
def test_each_good_device_gets_its_own_heads_within_budget(federation):
    summary, devices, root = federation
    assert summary["status"] == "ok"
    assert summary["devices_ok"] == len(GOOD)
    assert summary["all_within_budget"]
    for pid, tasks in GOOD.items():
        d = devices[f"device-{pid:04d}"]
        assert d["status"] == "ok", d["reason"]
        assert tuple(d["tasks"]) == tasks
        assert d["params_ratio"] <= d["budget"] + 1e-9
        assert set(d["metrics_compact"]) == set(tasks) == set(d["metrics_dense"])
        assert d["delta_m"] is not None and d["delta_m_oneshot"] is not None
        assert 0 < d["bytes_up_scores"] < 0.05 * d["bytes_dense_model"]
        models = store.ModelStore(root / "out" / "store" / "devices" / f"device-{pid:04d}")
        model, card = models.verify_active()  # the weights it holds, verified against their sha256
        assert models.active().weights_sha256 == d["weights_sha256"]
        assert model.task_names == list(tasks)  # exactly its heads, nothing else
        dense = build_model(ModelConfig.from_dict(card["config"]))
        assert count_params(model) <= d["budget"] * count_params(dense) + 1e-9
    assert (root / "out" / "report.md").is_file()
    assert (root / "out" / "size_vs_delta.png").is_file() and (root / "out" / "fleet.png").is_file()


@pytest.mark.slow
def test_misbehaving_devices_are_excluded_with_a_reason(federation):
    _, devices, _ = federation
    # A profile that does not decode has no trusted device id: the report names the node instead.
    unnamed = [d for name, d in devices.items() if name.startswith("node-")]
    assert len(unnamed) == 1
    for pid, (kind, fragment) in BAD.items():
        d = devices.get(f"device-{pid:04d}") if kind != "bad-profile" else unnamed[0]
        assert d["status"] in ("rejected", "failed"), kind
        assert fragment.lower() in d["reason"].lower(), (kind, d["reason"])
        assert not d["metrics_compact"]
    assert devices["device-0007"]["status"] == "failed"  # an error reply, not a contract violation
    assert devices["device-0004"]["status"] == "rejected"


@pytest.mark.slow
def test_arrays_transport_two_finetune_rounds_and_personalisation(tmp_path):
    """Deployment-style transport (base weights in the message), FedAvg over 2 rounds, alpha > 0."""
    from simulations.runner import run_scenario

    base = tiny_model_dir(tmp_path)
    devices = {0: {"tasks": ["seg", "depth"], "class": "small"}, 1: {"tasks": ["seg", "depth"], "class": "small"},
               2: {"tasks": ["normals"], "class": "large"}}
    path = scenario_file(tmp_path, base, transport="arrays", rounds=2, alpha=0.5, devices=devices)
    summary = run_scenario(path, out_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["devices_ok"] == 3, [d["reason"] for d in report["devices"]]
    assert summary["distinct_plans"] == 3  # alpha > 0: every device has its own plan
    for d in report["devices"]:
        assert d["params_ratio"] <= d["budget"] + 1e-9
        assert d["bytes_down"] > d["bytes_dense_model"]  # the base weights travelled to the device


# ------------------------------------------------------------------------------ pieces, no Flower


def test_fleet_assignment_is_deterministic_and_overridable():
    fleet = FleetSpec(tasks=("seg", "depth", "normals"), classes=(DeviceClass("a", 0.3), DeviceClass("b", 0.7)),
                      overrides={2: {"tasks": ["depth"], "class": "b", "misbehave": "nan"}}, seed=3)
    first = [assign(fleet, pid, 10) for pid in range(10)]
    assert first == [assign(fleet, pid, 10) for pid in range(10)]
    assert len({d.tasks for d in first}) > 1 and len({d.budget.value for d in first}) > 1
    assert first[2].tasks == ("depth",) and first[2].budget.value == 0.7
    assert FaultInjector(fleet).kind(first[2])[0] == "nan" and FaultInjector(fleet).kind(first[3])[0] == ""


def test_node_config_defines_a_real_device():
    device = device_from_node_config({"partition-id": 1, "num-partitions": 4, "tasks": "seg,normals",
                                      "budget": "macs=0.4", "device-class": "cam", "priority": "seg=2",
                                      "misbehave": "nan"}, None)
    assert device.tasks == ("seg", "normals") and device.budget.kind == "macs" and device.budget.value == 0.4
    assert device.priorities == {"seg": 2.0} and device.data == DataSpec()
    assert not hasattr(device, "misbehave")  # nothing in a node config can make a real device misbehave


def test_aggregate_weights_by_samples_and_median_resists_an_outlier():
    a = {"seg": {"g": np.array([1.0, 3.0])}}
    b = {"seg": {"g": np.array([3.0, 1.0])}, "depth": {"g": np.array([1.0, 1.0])}}
    out = aggregate([(a, {"seg": 3.0}), (b, {"seg": 1.0, "depth": 5.0})])
    # Per-task normalisation first: a -> [0.25, 0.75], b -> [0.75, 0.25]; weights 3:1.
    np.testing.assert_allclose(out["seg"]["g"], [0.25 * 0.75 + 0.75 * 0.25, 0.75 * 0.75 + 0.25 * 0.25])
    np.testing.assert_allclose(out["depth"]["g"], [0.5, 0.5])
    poisoned = {"seg": {"g": np.array([100.0, 0.0])}}
    med = aggregate([(a, {"seg": 1}), (a, {"seg": 1}), (poisoned, {"seg": 1000})], "median")
    np.testing.assert_allclose(med["seg"]["g"], [0.25, 0.75])


def test_personalisation_blends_own_scores():
    agg = {"seg": {"g": np.array([0.5, 0.5], dtype=np.float32)}}  # aggregated: per-task normalised
    own = {"seg": {"g": np.array([0.0, 2.0])}}  # normalised to [0, 1] before blending
    assert personalise(agg, own, ["seg"], 0.0)["seg"]["g"].tolist() == [0.5, 0.5]
    np.testing.assert_allclose(personalise(agg, own, ["seg"], 0.5)["seg"]["g"], [0.25, 0.75])
    with pytest.raises(ValueError):
        personalise(agg, own, ["seg"], 1.5)


def test_fedavg_and_update_checks():
    w1 = {"w": np.ones(3, np.float32), "n": np.array(2)}
    w2 = {"w": np.zeros(3, np.float32), "n": np.array(5)}
    avg = fedavg([(w1, 3.0), (w2, 1.0)])
    np.testing.assert_allclose(avg["w"], 0.75)
    assert avg["n"] == 5 and avg["w"].dtype == np.float32
    assert check_update(w1, w2) == ""
    assert "NaN" in check_update({"w": np.full(3, np.nan, np.float32), "n": np.array(1)}, w1)
    assert "shape" in check_update({"w": np.ones(2, np.float32), "n": np.array(1)}, w1) or "float32[2]" in \
        check_update({"w": np.ones(2, np.float32), "n": np.array(1)}, w1)


def test_privacy_clips_and_stays_non_negative():
    scores = {"seg": {"a": np.full(4, 3.0, np.float32), "b": np.full(4, 4.0, np.float32)}}
    clipped = privatise(scores, PrivacySettings(clip_norm=1.0))
    flat = np.concatenate(list(clipped["seg"].values()))
    assert np.linalg.norm(flat) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(flat, np.array([3.0] * 4 + [4.0] * 4) / 10.0, rtol=1e-6)  # scaled, not reshaped
    noisy = privatise(scores, PrivacySettings(clip_norm=1.0, noise_multiplier=2.0), np.random.default_rng(1))
    assert all((v >= 0).all() for v in noisy["seg"].values())
    assert privatise(scores, PrivacySettings()) is scores


def test_corrupt_produces_what_the_server_rejects():
    arrays = {"seg/g": np.ones(4, np.float16)}
    assert np.isnan(corrupt(arrays, "nan")["seg/g"]).any()
    assert len(corrupt(arrays, "wrong-length")["seg/g"]) == 3
    assert corrupt(arrays, "") is arrays


def _delivery(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16))
    dense = model.decompose(["seg", "depth"])
    from cut.groups import analyse

    sizes = analyse(dense).sizes
    keep = {g: tuple(range(max(1, n // 2))) for g, n in sizes.items()}
    plan = PruningPlan(base_model_sha256="a" * 64, tasks=("seg", "depth"), keep=keep, group_sizes=sizes)
    arrays = state_arrays(compact_model(dense, plan))
    spec = CompactModelSpec(plan=plan, architecture=json.loads(dense.config.to_json()),
                            weights_sha256=arrays_sha256(arrays), tasks=plan.tasks)
    return encode_spec(spec), arrays


def test_store_verifies_tasks_base_and_weights(tmp_path):
    data, arrays = _delivery(tmp_path)
    model, spec = store.receive(data, arrays, ("depth", "seg"), "a" * 64)
    assert model.task_names == ["seg", "depth"]
    stored = store.ModelStore(tmp_path).put_active(model, spec.plan, spec.weights_sha256)
    assert stored.weights_sha256 == spec.weights_sha256 == stored.source_sha256  # not adapted
    assert store.load(stored) is model
    reloaded, card = load_model(stored.directory)
    assert card["arrays_sha256"] == stored.weights_sha256 and reloaded.task_names == ["seg", "depth"]
    with pytest.raises(ValidationError, match="not this device's"):
        store.receive(data, arrays, ("seg",), "a" * 64)
    with pytest.raises(ValidationError, match="mismatch"):
        store.receive(data, arrays, ("seg", "depth"), "b" * 64)
    tampered = dict(arrays)
    name = next(iter(tampered))
    tampered[name] = tampered[name] + 1
    with pytest.raises(ValidationError, match="sha256 mismatch"):
        store.receive(data, tampered, ("seg", "depth"), "a" * 64)
    with pytest.raises(ValidationError, match="sha256 mismatch"):
        store.receive_weights(stored, tampered, spec.weights_sha256)


def test_settings_name_unknown_keys_and_scenarios():
    assert load_settings("default").devices >= 20
    assert load_settings("fleet-1000").devices == 1000
    assert load_settings("default", devices=5).devices == 5
    with pytest.raises(ValueError, match="unknown scenario"):
        load_settings("no-such-scenario")


def test_settings_reject_typos(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[scoring]\ncriterium = 'taylor'\n")
    with pytest.raises(ValueError, match="criterium"):
        load_settings(path)


class _FakeMessage:
    """Just enough of flwr's Message for server.exchange (the real one needs a running app)."""

    def __init__(self, content, dst_node_id=0, message_type="", group_id="", ttl=None, reply_to=None, error=None):
        import uuid
        from types import SimpleNamespace

        self.content, self.error = content, error
        self.metadata = SimpleNamespace(message_id=str(uuid.uuid4()), dst_node_id=dst_node_id,
                                        reply_to_message_id=reply_to.metadata.message_id if reply_to else "")

    def has_error(self) -> bool:
        return self.error is not None


class _FakeGrid:
    """Node 1 answers, node 2 never does, node 3 answers with an error."""

    def __init__(self):
        self.sent = {}

    def push_messages(self, messages):
        for m in messages:
            self.sent[m.metadata.message_id] = m
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        from types import SimpleNamespace

        from flwr.app import RecordDict

        out = []
        for mid in ids:
            m = self.sent.pop(mid, None)
            if m is None or m.metadata.dst_node_id == 2:
                if m is not None:
                    self.sent[mid] = m
                continue
            error = SimpleNamespace(code=1002, reason="Traceback...\nRuntimeError: boom") \
                if m.metadata.dst_node_id == 3 else None
            out.append(_FakeMessage(RecordDict(), reply_to=m, error=error))
        return out


def test_exchange_excludes_late_and_erroring_devices(monkeypatch):
    from flwr.app import ConfigRecord, RecordDict

    from server import exchange as ex
    from server.ledger import Ledger

    monkeypatch.setattr(ex, "Message", _FakeMessage)
    monkeypatch.setattr(ex, "POLL_SECONDS", 0.01)
    ledger = Ledger([1, 2, 3])
    contents = {n: RecordDict({"config": ConfigRecord({"x": b"12345"})}) for n in (1, 2, 3)}
    replies = ex.exchange(_FakeGrid(), ledger, "score", "query.score", contents, timeout=0.3, max_in_flight=2)
    assert list(replies) == [1]
    assert ledger.records[2].status == "failed" and "no reply within 0.3 s" in ledger.records[2].reason
    assert ledger.records[3].status == "failed" and "RuntimeError: boom" in ledger.records[3].reason
    assert all(r.bytes_down > 0 for r in ledger)
