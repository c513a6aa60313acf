"""Trust boundaries the server enforces: a device cannot buy influence with the sample count it claims, a
fine-tuning update cannot overwrite a plan's weights, and a refused device stays findable by what it claimed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from cut import wire
from cut.messages import Budget, ImportanceReport, TaskProfile
from protocol.records import PROFILE_REC
from server import app as server_app
from server.aggregate import aggregate, check_update
from server.ledger import REJECTED, DeviceRecord, Ledger


def _record(declared: int, used: int) -> DeviceRecord:
    record = DeviceRecord(1)
    record.profile = TaskProfile("d", ("seg",), Budget("params", 0.5), samples_per_task={"seg": declared})
    record.report = ImportanceReport("d", "m", "a" * 64, {"seg": {"g": np.ones(2, np.float32)}}, {"seg": used})
    return record


def test_a_device_cannot_buy_influence_by_claiming_samples():
    most = 32  # num_batches x batch_size of the scoring request
    assert server_app.sample_weights(_record(declared=48, used=32), most) == {"seg": 32.0}
    assert server_app.sample_weights(_record(declared=2**62, used=2**62), most) == {"seg": 32.0}
    assert server_app.sample_weights(_record(declared=10, used=32), most) == {"seg": 10.0}
    honest = [({"seg": {"g": np.array([1.0, 0.0])}}, {"seg": 32.0}) for _ in range(4)]
    hostile = ({"seg": {"g": np.array([0.0, 1.0])}}, server_app.sample_weights(_record(2**62, 2**62), most))
    mean = aggregate([*honest, hostile])["seg"]["g"]
    assert mean[0] == pytest.approx(0.8) and mean[1] == pytest.approx(0.2)  # one device of five: a fifth


def test_an_update_that_would_overwrite_the_plan_is_refused():
    rng = np.random.default_rng(0)
    reference = {"w": rng.normal(size=(8, 8)).astype(np.float32), "bn.running_mean": np.zeros(8, np.float32)}
    small = {"w": reference["w"] * 1.01, "bn.running_mean": np.ones(8, np.float32) * 5}  # stats may move freely
    assert check_update(small, reference) == ""
    scaled = {"w": reference["w"] * 1e6, "bn.running_mean": reference["bn.running_mean"]}
    assert "of their norm" in check_update(scaled, reference)
    flipped = {"w": -reference["w"], "bn.running_mean": reference["bn.running_mean"]}
    assert "of their norm" in check_update(flipped, reference)


def test_a_refused_profile_is_reported_under_the_id_it_claimed(monkeypatch, tmp_path):
    from test_inbound_fuzz import SETTINGS

    bad = wire.encode_profile(TaskProfile("cam-7", ("seg", "bogus"), Budget("params", 0.5)))
    good = wire.encode_profile(TaskProfile("cam-8", ("seg",), Budget("params", 0.5)))
    replies = {n: SimpleNamespace(content=RecordDict({PROFILE_REC: ConfigRecord({"data": data})}))
               for n, data in ((1, bad), (2, good))}
    monkeypatch.setattr(server_app, "exchange", lambda *args, **kwargs: replies)
    base = SimpleNamespace(task_names=("seg", "depth"), canonical=lambda tasks: tuple(tasks))
    ledger = Ledger([1, 2])
    server_app.collect_profiles(None, ledger, SETTINGS, base)
    refused, accepted = ledger.records[1], ledger.records[2]
    assert refused.status == REJECTED and "bogus" in refused.reason
    assert refused.declared_id == "cam-7" and refused.device_id == ""  # labelled, never trusted
    assert accepted.ok and accepted.device_id == "cam-8"
