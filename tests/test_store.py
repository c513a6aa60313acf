"""The device's model store: atomic, content-addressed, last N kept, one active model that a refused or
interrupted delivery never replaces."""

from __future__ import annotations

import json

import pytest
import torch

from client import store
from client.device import device_from_node_config
from cut.compact import compact_model
from cut.data.scenes import scene_tasks
from cut.groups import analyse
from cut.messages import CompactModelSpec, ValidationError
from cut.models import ModelConfig, build_model
from cut.plan import PruningPlan
from cut.wire import arrays_sha256, encode_spec
from protocol.records import state_arrays

BASE_SHA = "a" * 64


def delivery(fraction: float, seed: int = 0, plan_fraction: float | None = None):
    """What train.deliver carries for a (seg, depth) plan keeping `fraction` of each group (the spec may
    announce the plan of another fraction: weights that do not fit their plan)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16))
    dense = model.decompose(["seg", "depth"])
    sizes = analyse(dense).sizes
    keep = {g: tuple(range(max(1, int(n * fraction)))) for g, n in sizes.items()}
    plan = PruningPlan(base_model_sha256=BASE_SHA, tasks=("seg", "depth"), keep=keep, group_sizes=sizes)
    arrays = state_arrays(compact_model(dense, plan))
    if plan_fraction is not None:
        keep = {g: tuple(range(max(1, int(n * plan_fraction)))) for g, n in sizes.items()}
        plan = PruningPlan(base_model_sha256=BASE_SHA, tasks=("seg", "depth"), keep=keep, group_sizes=sizes)
    spec = CompactModelSpec(plan=plan, architecture=json.loads(dense.config.to_json()),
                            weights_sha256=arrays_sha256(arrays), tasks=plan.tasks)
    return encode_spec(spec), arrays


def deliver(models: store.ModelStore, data: bytes, arrays) -> store.StoredModel:
    """The device's deliver path: verify and rebuild, then keep and activate (as client.app does)."""
    model, spec = store.receive(data, arrays, ("seg", "depth"), BASE_SHA)
    return models.put_active(model, spec.plan, spec.weights_sha256)


def test_delivered_model_is_stored_verified_and_active(tmp_path):
    models = store.ModelStore(tmp_path)
    assert models.active() is None
    with pytest.raises(ValidationError, match="no active model"):
        models.verify_active()
    stored = deliver(models, *delivery(0.5))
    assert models.active() == stored
    assert stored.directory == tmp_path / "models" / stored.weights_sha256
    model, card = models.verify_active()
    assert card["tasks"] == ["seg", "depth"] and model.task_names == ["seg", "depth"]
    assert arrays_sha256(state_arrays(model)) == stored.weights_sha256
    # Delivering the same weights again is idempotent.
    assert deliver(models, *delivery(0.5)) == stored
    assert models.history() == [stored.weights_sha256]


def test_only_the_last_n_models_are_kept(tmp_path):
    models = store.ModelStore(tmp_path, keep=2)
    shas = [deliver(models, *delivery(f)).weights_sha256 for f in (0.25, 0.5, 0.75)]
    assert len(set(shas)) == 3
    assert models.history() == [shas[2], shas[1]]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(shas[1:])
    # Re-activating a kept older model moves it to the front; nothing else is lost.
    older = store.StoredModel(tmp_path / "models" / shas[1], shas[1], models.active().plan_hash, shas[1])
    models.activate(older)
    assert models.history() == [shas[1], shas[2]]


@pytest.mark.parametrize("tamper", ["weights", "plan"])
def test_a_refused_delivery_keeps_the_previous_model_active(tmp_path, tamper):
    models = store.ModelStore(tmp_path)
    first = deliver(models, *delivery(0.5))
    if tamper == "weights":
        data, arrays = delivery(0.75)
        name = next(iter(arrays))
        arrays = {**arrays, name: arrays[name] + 1}
        match = "sha256 mismatch"
    else:
        data, arrays = delivery(0.75, plan_fraction=0.25)
        match = "do not fit"
    with pytest.raises(ValidationError, match=match):
        deliver(models, data, arrays)
    assert models.active() == first
    models.verify_active()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.weights_sha256]


def test_a_crash_while_writing_leaves_the_active_model_intact(tmp_path, monkeypatch):
    models = store.ModelStore(tmp_path)
    first = deliver(models, *delivery(0.5))
    real_save = store.save_model

    def crash_after_weights(directory, model, card=None):
        real_save(directory, model, card)
        (directory / "model.json").write_text("{ half a card")
        raise KeyboardInterrupt("power lost")

    monkeypatch.setattr(store, "save_model", crash_after_weights)
    with pytest.raises(KeyboardInterrupt):
        deliver(models, *delivery(0.75))
    monkeypatch.undo()
    assert models.active() == first
    models.verify_active()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.weights_sha256]


def test_a_damaged_active_model_is_detected(tmp_path):
    models = store.ModelStore(tmp_path)
    stored = deliver(models, *delivery(0.5))
    weights = stored.directory / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValidationError, match="damaged"):
        models.verify_active()
    (tmp_path / "active.json").write_text("not json")
    with pytest.raises(ValidationError, match="active.json is damaged"):
        models.active()


def test_node_config_chooses_the_store(tmp_path):
    from flwr.app import Context, RecordDict

    from protocol.phases import DataSpec
    from simulations.app import FleetIdentity
    from simulations.fleet import DeviceClass, FleetSpec

    fleet = FleetSpec(tasks=("seg",), classes=(DeviceClass("micro", 0.3),), data=DataSpec(),
                      store_root=str(tmp_path / "shared"))
    context = Context(run_id=0, node_id=1, node_config={"partition-id": 3, "num-partitions": 10}, state=RecordDict(),
                      run_config={})
    simulated = FleetIdentity(fleet)(context, None)
    assert simulated.store_shared and simulated.store_root == str(tmp_path / "shared")
    with pytest.raises(ValueError, match="names no tasks"):  # a real device is never assigned by a fleet
        device_from_node_config({"partition-id": 3, "num-partitions": 10}, DataSpec())
    own = device_from_node_config({"tasks": "seg", "store-dir": str(tmp_path / "mine"), "store-keep": 5}, None)
    assert not own.store_shared and own.store_keep == 5 and own.store_root == str(tmp_path / "mine")
    with pytest.raises(ValueError, match="store-keep"):
        device_from_node_config({"tasks": "seg", "store-keep": 0}, None)
    with pytest.raises(ValueError, match="keep"):
        store.ModelStore(tmp_path, keep=0)
