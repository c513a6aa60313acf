"""The federation end to end on Flower's simulation engine, plus the pieces it is made of.

Long because one module-scoped federation run serves many assertions (a run costs minutes).

The simulations use a tiny untrained model (width 0.125, 32x32 inputs) so they need no pre-training:
what is checked is the protocol (every device gets a model with exactly its heads, within its budget,
and reports metrics; misbehaving devices are excluded with their reason while the others complete), not
accuracy.
"""

from __future__ import annotations

import json
import math
import statistics
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
from cut.metrics import delta_m
from cut.models import ModelConfig, build_model, count_params
from cut.plan import PruningPlan
from cut.wire import arrays_sha256, encode_spec
from protocol.phases import DataSpec
from protocol.records import state_arrays
from server.aggregate import aggregate, check_update, fedavg, personalise
from simulations.faults import FaultInjector, corrupt
from simulations.fleet import DeviceClass, FleetSpec, assign

# Devices 0 and 9 have the same tasks and class: one plan, so their fine-tuned updates are averaged together.
GOOD = {0: ("seg",), 1: ("depth", "normals"), 2: ("seg", "depth", "normals"), 3: ("seg", "normals"), 9: ("seg",)}
SHARED_PLAN = (0, 9)
BAD = {4: ("nan", "NaN", "rejected"), 5: ("wrong-length", "expected", "rejected"),
       6: ("unknown-task", "unknown task", "rejected"), 7: ("crash", "crashed", "failed"),
       8: ("bad-profile", "unknown task", "rejected")}
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # re-estimated by each device on adoption


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


def assert_delta_m_consistent(entry: dict, config: ModelConfig) -> None:
    """A device's delta_m (after fine-tuning) and delta_m_oneshot (as delivered) are finite, in a sane range,
    and equal to cut.metrics.delta_m of the report's own per-task primary metrics (compact or one-shot vs
    dense, each task's direction from the model config)."""
    tasks = entry["tasks"]
    directions = {t: config.task(t).higher_is_better for t in tasks}
    dense = {t: entry["metrics_dense"][t][config.task(t).primary_metric] for t in tasks}
    for key, metrics in (("delta_m", "metrics_compact"), ("delta_m_oneshot", "metrics_oneshot")):
        value = entry[key]
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        mine = {t: entry[metrics][t][config.task(t).primary_metric] for t in tasks}
        assert all(math.isfinite(v) and v >= 0 for v in (*mine.values(), *dense.values())), (mine, dense)
        assert value == pytest.approx(delta_m(mine, dense, directions), rel=1e-9, abs=1e-9), key
        # Errors and scores are >= 0: a lower-is-better task gains at most 100 %, a higher-is-better one
        # loses at most 100 %; a tiny model may lose much more on error metrics, but not without bound.
        assert -1000.0 < value < 1000.0, (key, value)


class FedAvgSpy:
    """Records every server.app.fedavg call: (the updates and their weights, the averaged result)."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, []

    def __call__(self, updates):
        result = self.real(updates)
        self.calls.append(([(dict(a), float(n)) for a, n in updates], result))
        return result


def assert_weighted_average(updates, result) -> None:
    """FedAvg's result: float arrays the sample-weighted mean, integer counters the largest value."""
    total = sum(n for _, n in updates)
    assert total > 0 and all(n > 0 for _, n in updates)
    assert set(result) == set(updates[0][0])
    for name, got in result.items():
        stack = np.stack([a[name] for a, _ in updates])
        if np.issubdtype(got.dtype, np.floating):
            want = sum(n * a[name].astype(np.float64) for a, n in updates) / total
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, stack.max(axis=0), err_msg=name)
        assert got.dtype == updates[0][0][name].dtype and got.shape == updates[0][0][name].shape


def plain_fedavg(path: Path) -> Path:
    """The scenario with every FedAvg result adopted: where the server has an update gate
    (`[finetune] gate`, which may refuse an average that moves away from the dense teacher), it is turned off,
    so these tests see FedAvg itself."""
    from server.settings import FinetuneSettings

    if "gate" in FinetuneSettings.model_fields:
        path.write_text(path.read_text().replace("[finetune]\n", "[finetune]\ngate = false\n"))
    return path


def assert_holds_averaged_weights(store_dir: Path, averaged: dict[str, np.ndarray]) -> None:
    """The device's active model was made from `averaged` (its source sha), and holds exactly those weights
    except the BatchNorm statistics it re-estimated on its own data."""
    models = store.ModelStore(store_dir)
    assert models.active().source_sha256 == arrays_sha256(averaged)
    model, _ = models.verify_active()
    held = state_arrays(model)
    assert set(held) == set(averaged)
    for name, value in averaged.items():
        if not name.endswith(BN_STATISTICS):
            np.testing.assert_array_equal(held[name], value, err_msg=name)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    import server.app
    from simulations.runner import run_scenario

    root = tmp_path_factory.mktemp("federation")
    base = tiny_model_dir(root)
    devices = {pid: {"tasks": list(tasks)} for pid, tasks in GOOD.items()}
    devices[3]["priority"] = {"seg": 2.0, "normals": 1.0}
    for pid in SHARED_PLAN:
        devices[pid]["class"] = "small"
    devices.update({pid: {"misbehave": kind} for pid, (kind, _, _) in BAD.items()})
    spy = FedAvgSpy(server.app.fedavg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server.app, "fedavg", spy)
        summary = run_scenario(plain_fedavg(scenario_file(root, base, devices=devices)), out_dir=root / "out")
    report = json.loads((root / "out" / "report.json").read_text())
    return summary, {d["device_id"]: d for d in report["devices"]}, root, spy.calls


@pytest.mark.slow
def test_each_good_device_gets_its_own_heads_within_budget(federation):
    summary, devices, root, _ = federation
    config = load_model(root / "base")[0].config
    assert summary["status"] == "ok"
    assert summary["devices_ok"] == len(GOOD)
    assert summary["all_within_budget"]
    for pid, tasks in GOOD.items():
        d = devices[f"device-{pid:04d}"]
        assert d["status"] == "ok", d["reason"]
        assert tuple(d["tasks"]) == tasks
        assert d["params_ratio"] <= d["budget"] + 1e-9
        assert set(d["metrics_compact"]) == set(tasks) == set(d["metrics_dense"]) == set(d["metrics_oneshot"])
        assert_delta_m_consistent(d, config)
        assert 0 < d["bytes_up_scores"] < 0.05 * d["bytes_dense_model"]
        models = store.ModelStore(root / "out" / "store" / "devices" / f"device-{pid:04d}")
        model, card = models.verify_active()  # the weights it holds, verified against their sha256
        assert models.active().weights_sha256 == d["weights_sha256"]
        assert model.task_names == list(tasks)  # exactly its heads, nothing else
        dense = build_model(ModelConfig.from_dict(card["config"]))
        assert count_params(model) <= d["budget"] * count_params(dense) + 1e-9
    ok = [devices[f"device-{pid:04d}"] for pid in GOOD]
    assert summary["delta_m"]["n"] == len(GOOD)
    assert summary["delta_m"]["mean"] == pytest.approx(statistics.fmean(d["delta_m"] for d in ok))
    assert summary["delta_m_oneshot"]["mean"] == pytest.approx(statistics.fmean(d["delta_m_oneshot"] for d in ok))
    assert (root / "out" / "report.md").is_file()
    assert (root / "out" / "size_vs_delta.png").is_file() and (root / "out" / "fleet.png").is_file()


@pytest.mark.slow
def test_devices_of_one_plan_end_holding_their_fedavg_average(federation):
    """One fine-tune round: per plan, FedAvg's result is the sample-weighted average of its devices'
    updates, and every device of the plan ends holding that average (its BatchNorm statistics aside)."""
    _, devices, root, calls = federation
    shared = [devices[f"device-{pid:04d}"] for pid in SHARED_PLAN]
    assert shared[0]["plan_hash"] == shared[1]["plan_hash"]
    plans = {devices[f"device-{pid:04d}"]["plan_hash"] for pid in GOOD}
    assert len(plans) == len(GOOD) - 1  # the other devices each have their own plan
    assert sorted(len(updates) for updates, _ in calls) == [1] * (len(plans) - 1) + [2]  # one call per plan
    for updates, result in calls:
        assert_weighted_average(updates, result)
    (updates, averaged), = [c for c in calls if len(c[0]) == 2]
    (a, _), (b, _) = updates
    moved = [k for k in a if a[k].dtype.kind == "f" and not np.array_equal(a[k], b[k])]
    assert moved  # the two devices trained on different data: the average is not just one of them
    assert not np.array_equal(averaged[moved[0]], a[moved[0]])
    for pid in SHARED_PLAN:
        assert_holds_averaged_weights(root / "out" / "store" / "devices" / f"device-{pid:04d}", averaged)
    held = [store.ModelStore(root / "out" / "store" / "devices" / f"device-{pid:04d}").verify_active()[0]
            for pid in SHARED_PLAN]
    first, second = (state_arrays(m) for m in held)
    assert all(np.array_equal(first[k], second[k]) for k in first if not k.endswith(BN_STATISTICS))


@pytest.mark.slow
def test_misbehaving_devices_are_excluded_with_a_reason(federation):
    _, devices, _, _ = federation
    # A profile that does not decode has no trusted device id: the report names the node instead.
    unnamed = [d for name, d in devices.items() if name.startswith("node-")]
    assert len(unnamed) == 1
    for pid, (kind, fragment, status) in BAD.items():
        d = devices.get(f"device-{pid:04d}") if kind != "bad-profile" else unnamed[0]
        # rejected: what it sent breaks the contract; failed: an error reply (the crash)
        assert d["status"] == status, (kind, d["status"], d["reason"])
        assert fragment.lower() in d["reason"].lower(), (kind, d["reason"])
        assert not d["metrics_compact"] and d["delta_m"] is None
    phases = {kind: devices.get(f"device-{pid:04d}", unnamed[0])["reason"].split(":")[0]
              for pid, (kind, _, _) in BAD.items()}
    assert phases == {"nan": "score", "wrong-length": "score", "unknown-task": "score", "crash": "score",
                      "bad-profile": "profile"}


@pytest.mark.slow
def test_arrays_transport_two_finetune_rounds_and_personalisation(tmp_path, monkeypatch):
    """Deployment-style transport (base weights in the message), FedAvg over 2 rounds, alpha > 0."""
    import server.app
    from simulations.runner import run_scenario

    base = tiny_model_dir(tmp_path)
    devices = {0: {"tasks": ["seg", "depth"], "class": "small"}, 1: {"tasks": ["seg", "depth"], "class": "small"},
               2: {"tasks": ["normals"], "class": "large"}}
    path = plain_fedavg(scenario_file(tmp_path, base, transport="arrays", rounds=2, alpha=0.5, devices=devices))
    spy = FedAvgSpy(server.app.fedavg)
    monkeypatch.setattr(server.app, "fedavg", spy)
    summary = run_scenario(path, out_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["devices_ok"] == 3, [d["reason"] for d in report["devices"]]
    assert summary["distinct_plans"] == 3  # alpha > 0: every device has its own plan
    assert summary["finetune_rounds"] == 2
    for d in report["devices"]:
        assert d["params_ratio"] <= d["budget"] + 1e-9
        assert d["bytes_down"] > d["bytes_dense_model"]  # the base weights travelled to the device
    # Two rounds x three plans (one device each): FedAvg ran 6 times, each a weighted average of its updates.
    assert [len(updates) for updates, _ in spy.calls] == [1] * 6
    for updates, result in spy.calls:
        assert_weighted_average(updates, result)
    first, last = spy.calls[:3], spy.calls[3:]
    # Round 2 trained again: none of its averages is one of round 1's.
    assert {arrays_sha256(r) for _, r in first}.isdisjoint({arrays_sha256(r) for _, r in last})
    # Each device ends holding its plan's last average (BatchNorm statistics re-estimated on its data).
    final = {arrays_sha256(result): result for _, result in last}
    for d in report["devices"]:
        stored = store.ModelStore(tmp_path / "out" / "store" / "devices" / d["device_id"])
        assert stored.active().weights_sha256 == d["weights_sha256"]
        assert stored.active().source_sha256 in final
        assert_holds_averaged_weights(stored.root, final[stored.active().source_sha256])
    assert len({store.ModelStore(tmp_path / "out" / "store" / "devices" / d["device_id"]).active().source_sha256
                for d in report["devices"]}) == 3


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
    assert check_update({"w": np.full(3, np.nan, np.float32), "n": np.array(1)}, w1) == \
        "update array 'w' holds NaN or inf"
    assert check_update({"w": np.ones(2, np.float32), "n": np.array(1)}, w1) == \
        "update array 'w' is float32[2], expected float32[3]"


def test_privacy_clips_and_stays_non_negative():
    scores = {"seg": {"a": np.full(4, 3.0, np.float32), "b": np.full(4, 4.0, np.float32)}}
    clipped = privatise(scores, PrivacySettings(clip_norm=1.0))
    flat = np.concatenate(list(clipped["seg"].values()))
    assert np.linalg.norm(flat) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(flat, np.array([3.0] * 4 + [4.0] * 4) / 10.0, rtol=1e-6)  # scaled, not reshaped
    noisy = privatise(scores, PrivacySettings(clip_norm=1.0, noise_multiplier=2.0), np.random.default_rng(1))
    assert all((v >= 0).all() for v in noisy["seg"].values())
    assert privatise(scores, PrivacySettings()) is scores


def _distance_to_teacher(student, teacher, loader) -> dict[str, float]:
    """Per task, how far the student's outputs are from the teacher's on held-out images: total variation
    of the seg class probabilities, mean absolute depth difference."""
    import torch.nn.functional as F

    student.eval()
    out = {"seg": 0.0, "depth": 0.0}
    with torch.no_grad():
        for images, _ in loader:
            s, t = student(images), teacher(images)
            out["seg"] += float((F.softmax(s["seg"], 1) - F.softmax(t["seg"], 1)).abs().sum(1).mean()) / len(loader)
            out["depth"] += float((s["depth"] - t["depth"]).abs().mean()) / len(loader)
    return out


def test_finetune_distils_the_compact_model_towards_its_dense_teacher():
    """What a device runs each fine-tune round (cut.train.finetune with its dense base as the teacher): with
    the distillation term the compact student's outputs move towards the teacher's, on images it did not
    train on; with the task loss alone they do not."""
    from cut.data import get_dataset
    from cut.groups import analyse
    from cut.train import finetune, make_loader

    torch.manual_seed(0)
    config = ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16)
    teacher = build_model(config).decompose(["seg", "depth"]).eval()
    sizes = analyse(teacher).sizes
    plan = PruningPlan(base_model_sha256="a" * 64, tasks=("seg", "depth"), group_sizes=sizes,
                       keep={g: tuple(range(max(1, n // 2))) for g, n in sizes.items()})
    train = make_loader(get_dataset("scenes", "train", num_samples=64, size=32, seed=0), 8, shuffle=True, seed=0)
    held_out = make_loader(get_dataset("scenes", "test", num_samples=32, size=32, seed=1), 16)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    after = {}
    for weight in (1.0, 0.0):
        torch.manual_seed(1)  # the same student, made from another initialisation than the teacher
        student = compact_model(build_model(config).decompose(["seg", "depth"]), plan)
        before = _distance_to_teacher(student, teacher, held_out)
        finetune(student, teacher, train, steps=20, lr=3e-3, distill_weight=weight, progress=False)
        after[weight] = _distance_to_teacher(student, teacher, held_out)
    for task in ("seg", "depth"):
        assert after[1.0][task] < 0.5 * before[task], (task, before[task], after[1.0][task])
        assert after[1.0][task] < 0.5 * after[0.0][task], (task, after)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # the teacher is frozen


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


class _FakeClock:
    """time.monotonic / time.sleep for server.exchange: time passes only when the exchange sleeps."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1


def test_exchange_excludes_late_and_erroring_devices(monkeypatch):
    """No wall clock: the exchange's clock is fake, so 'late' is decided by the deadline alone."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from protocol.records import content_nbytes
    from server import exchange as ex
    from server.ledger import Ledger

    clock = _FakeClock()
    monkeypatch.setattr(ex, "Message", _FakeMessage)
    monkeypatch.setattr(ex, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    ledger = Ledger([1, 2, 3])
    contents = {n: RecordDict({"config": ConfigRecord({"x": b"12345"})}) for n in (1, 2, 3)}
    replies = ex.exchange(_FakeGrid(), ledger, "score", "query.score", contents, timeout=30.0, max_in_flight=2)
    assert list(replies) == [1]
    assert ledger.records[1].ok and ledger.records[1].bytes_up == 0  # an empty reply: no payload bytes
    assert ledger.records[2].status == "failed" and ledger.records[2].reason == "score: no reply within 30 s"
    assert ledger.records[3].status == "failed" and ledger.records[3].reason == "score: device error: RuntimeError: boom"
    # node 2 was waited for until its deadline, polled every POLL_SECONDS, and not a poll longer
    assert 30.0 < clock.now - 1000.0 <= 30.0 + 2 * ex.POLL_SECONDS
    assert clock.sleeps == pytest.approx(30.0 / ex.POLL_SECONDS, abs=2)
    sent = content_nbytes(contents[1])
    assert sent > 0 and all(r.bytes_down == sent for r in ledger)  # each was sent its message once
