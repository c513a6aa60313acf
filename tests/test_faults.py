"""Faults: devices dropping out mid-flow, and a server that restarts and resumes from its run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

import server.app as server_app
from cut.checkpoint import load_model
from server.rundir import RunState
from tests.test_federation import assert_delta_m_consistent, scenario_file, tiny_model_dir

# 10 devices, 3 of them (30%) leave at different phases: one too slow to answer the score query, one gone
# during delivery, one gone during fine-tuning.
DROPOUTS = {2: ("slow", "score", "no reply within"), 5: ("drop-deliver", "deliver", "dropped out"),
            8: ("drop-finetune", "finetune-1", "dropped out")}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("faults"))


@pytest.mark.slow
def test_thirty_percent_dropping_out_mid_flow_are_excluded_and_the_rest_complete(base_dir, tmp_path):
    from simulations.runner import run_scenario

    devices = {pid: {"tasks": ["seg", "depth"] if pid % 2 else ["normals"]} for pid in range(10)}
    # The score deadline leaves honest devices room on a loaded machine; the slow one answers long after it.
    for pid, (kind, _, _) in DROPOUTS.items():
        devices[pid].update(misbehave=kind, slow_seconds=50.0)
    scenario = scenario_file(tmp_path, base_dir, devices=devices, timeouts="score = 30\n")
    summary = run_scenario(scenario, out_dir=tmp_path / "out")
    report = {d["device_id"]: d for d in json.loads((tmp_path / "out" / "report.json").read_text())["devices"]}
    assert summary["status"] == "ok"
    assert summary["devices_ok"] == 7 and summary["devices_failed"] == 3
    for pid, (_, phase, fragment) in DROPOUTS.items():
        d = report[f"device-{pid:04d}"]
        assert d["status"] == "failed" and d["reason"].startswith(f"{phase}:") and fragment in d["reason"], d
    config = load_model(base_dir)[0].config
    for pid in set(range(10)) - set(DROPOUTS):
        d = report[f"device-{pid:04d}"]
        assert d["status"] == "ok", d
        assert_delta_m_consistent(d, config)  # finite, sane, and what its own dense/compact metrics give
    for pid in DROPOUTS:  # no metrics from a device that left: no delta_m either
        assert report[f"device-{pid:04d}"]["delta_m"] is None
    assert summary["delta_m"]["n"] == 7


ROUND = 4  # finetune_round(grid, ledger, settings, book, round_, ...): the round's position


def _crash_at(monkeypatch, name: str, when=lambda *args: True):
    """Make the server die inside phase function `name` (as a killed process would, mid-run)."""
    real = getattr(server_app, name)

    def dying(*args, **kwargs):
        if when(*args):
            raise RuntimeError(f"server killed during {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(server_app, name, dying)


@pytest.mark.slow
def test_a_restarted_server_resumes_without_asking_devices_to_score_again(base_dir, tmp_path, monkeypatch):
    from simulations.runner import run_scenario

    devices = {pid: {"tasks": ["seg", "normals"] if pid % 2 else ["depth"]} for pid in range(4)}
    scenario = scenario_file(tmp_path, base_dir, devices=devices, rounds=2)
    out = tmp_path / "out"

    # 1. The server dies after every device reported its scores.
    _crash_at(monkeypatch, "plan_devices")
    with pytest.raises(RuntimeError, match="server killed|without a report"):
        run_scenario(scenario, out_dir=out)
    kept = RunState(out, json.loads((base_dir / "model.json").read_text())["weights_sha256"], "test", resume=True)
    assert kept.kept_devices() == [f"device-{pid:04d}" for pid in range(4)]
    monkeypatch.undo()

    # 2. It dies again during the second fine-tuning round: the first round's averaged weights are kept.
    _crash_at(monkeypatch, "finetune_round", when=lambda *args: args[ROUND] == 2)
    with pytest.raises(RuntimeError, match="server killed|without a report"):
        run_scenario(scenario, out_dir=out, resume=True)
    monkeypatch.undo()
    state = json.loads((out / "state" / "manifest.json").read_text())
    assert state["finetune_round"] == 1
    assert (out / "state" / "aggregated.npz").is_file()
    assert len(list((out / "state" / "builds").glob("*.npz"))) == len(list((out / "state" / "plans").glob("*.json")))

    # 3. The restarted server completes: no device scored again, and fine-tuning went on at round 2.
    rounds: list[int] = []
    real_round = server_app.finetune_round
    monkeypatch.setattr(server_app, "finetune_round", lambda *a: (rounds.append(a[ROUND]), real_round(*a))[1])
    summary = run_scenario(scenario, out_dir=out, resume=True)
    assert summary["status"] == "ok" and summary["devices_ok"] == 4
    assert rounds == [2]
    report = json.loads((out / "report.json").read_text())
    for d in report["devices"]:
        assert d["report_source"] == "resumed" and d["bytes_up_scores"] == 0, d
    assert summary["reports_resumed"] == 4


def test_run_state_round_trips_and_refuses_another_base_model(tmp_path):
    state = RunState(tmp_path, "a" * 64, "test", resume=False)
    arrays = {"seg|layer1": np.arange(4, dtype=np.float16), "depth|head": np.ones(3, dtype=np.float16)}
    state.keep_report("device/../0001", b"\x08\x01header", arrays)
    header, back = state.kept_report("device/../0001")
    assert header == b"\x08\x01header" and set(back) == set(arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert len(state.kept_devices()) == 1 and (tmp_path / "state" / "reports").is_dir()
    scores = {"seg": {"g1": np.ones(3, np.float32)}, "depth": {"g1": np.zeros(2, np.float32)}}
    state.keep_aggregated(scores, ["b", "a"])
    assert state.kept_aggregated(["a", "b"])["seg"]["g1"].tolist() == [1.0, 1.0, 1.0]
    assert state.kept_aggregated(["a"]) is None  # made from other devices: not reused
    assert state.has_aggregated(["a", "b"]) and not state.has_aggregated(["a", "b", "c"])
    resumed = RunState(tmp_path, "a" * 64, "test", resume=True)
    assert resumed.resumed and resumed.kept_report("device/../0001") is not None
    assert resumed.kept_aggregated(["a", "b"])["depth"]["g1"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="base model"):
        RunState(tmp_path, "b" * 64, "test", resume=True)
    assert not RunState(tmp_path / "elsewhere", "a" * 64, "test", resume=True).resumed  # nothing to continue
    fresh = RunState(tmp_path, "b" * 64, "test", resume=False)  # not resuming: start over
    assert not fresh.resumed and fresh.kept_devices() == []
    (tmp_path / "state" / "reports" / "x.npz").write_bytes(b"not a zip")
    assert fresh.kept_report("x") is None  # unreadable: that device scores again


@pytest.mark.slow
def test_a_resumed_run_measures_one_shot_on_the_recovered_weights_not_the_fine_tuned_ones(base_dir, tmp_path,
                                                                                            monkeypatch):
    """The one-shot figure is the model as recovered on the server, before any fine-tuning. A run resumed
    after its fine-tuning rounds must deliver (and so measure) those pristine weights, cached by plan hash in
    the run directory, and only then continue from the fine-tuned ones."""
    from simulations.runner import run_scenario

    devices = {pid: {"tasks": ["seg", "depth"] if pid % 2 else ["normals"]} for pid in range(2)}
    scenario = scenario_file(tmp_path, base_dir, devices=devices, rounds=1)
    text = scenario.read_text().replace("[finetune]\n", "[finetune]\ngate = false\n")  # adopt every average
    scenario.write_text(text + "\n[recovery]\nsteps = 4\nsamples = 16\nbatch_size = 8\n")
    out = tmp_path / "out"
    run_scenario(scenario, out_dir=out)  # complete: fine-tuned weights and round 1 are kept in OUT/state
    first = {d["device_id"]: d for d in json.loads((out / "report.json").read_text())["devices"]}
    assert json.loads((out / "state" / "manifest.json").read_text())["finetune_round"] == 1

    delivered: dict[str, dict] = {}
    real_deliver = server_app.deliver_models

    def spy(grid, ledger, settings, book):
        delivered.update({h: dict(b.arrays) for h, b in book.builds.items()})
        return real_deliver(grid, ledger, settings, book)

    monkeypatch.setattr(server_app, "deliver_models", spy)
    summary = run_scenario(scenario, out_dir=out, resume=True)
    assert summary["status"] == "ok"
    state = RunState(out, json.loads((base_dir / "model.json").read_text())["weights_sha256"], "test", resume=True)
    assert delivered
    for plan_hash, arrays in delivered.items():
        recovered, tuned = state.kept_recovered(plan_hash), state.kept_weights(plan_hash)
        assert any(not np.array_equal(recovered[k], tuned[k]) for k in recovered)  # fine-tuning changed them
        assert all(np.array_equal(arrays[k], recovered[k]) for k in recovered), "delivered the fine-tuned weights"
    for d in json.loads((out / "report.json").read_text())["devices"]:
        before = first[d["device_id"]]
        assert d["delta_m_oneshot"] == pytest.approx(before["delta_m_oneshot"], abs=1e-6), d["device_id"]
        assert d["delta_m"] == pytest.approx(before["delta_m"], abs=1e-6), d["device_id"]
