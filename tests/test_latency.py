"""Latency budgets: the measured table's cost model, hardware-aware rounding, no-saving groups, the cache.

No timing is asserted: synthetic tables with known times test the planning, and the one test that
measures on this machine only checks the table's structure and the cache.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cut import latency as L
from cut.budget import BudgetOptions, check_budget, cost_for, make_plan
from cut.data.scenes import scene_tasks
from cut.groups import analyse
from cut.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(tasks=scene_tasks(), width=0.25, input_size=(32, 32))).decompose(["seg", "depth"])


@pytest.fixture(scope="module")
def analysis(model):
    return analyse(model)


def macs_table(model, analysis, round_to: int = 8, flat: frozenset[str] = frozenset(),
               calibration=((1.0, 1.0), (1e6, 1e6))) -> L.LatencyTable:
    """A table whose layer times are the layer's MACs / 1000 us (flat: the same time at every count)."""
    groups = L.layer_groups(analysis)
    sizes = analysis.cost.group_sizes
    layers = []
    for spec in L.layer_specs(model):
        gi, go = groups.get(spec.name, (-1, -1))
        cins = L.grid_counts(int(sizes[gi]), round_to) if gi >= 0 else (spec.cin,)
        couts = L.grid_counts(int(sizes[go]), round_to) if go >= 0 else (spec.cout,)
        positions = (spec.in_hw[0] // spec.stride[0]) * (spec.in_hw[1] // spec.stride[1])
        k = spec.kernel[0] * spec.kernel[1]
        owner = {analysis.groups[j].name for j in (gi, go) if j >= 0}
        us = tuple(tuple(float(cins[-1] * couts[-1] * k * positions / 1e3) if owner & flat
                         else float(ci * co * k * positions / 1e3) for co in couts) for ci in cins)
        layers.append(L.LayerTiming(spec.name, cins, couts, us))
    return L.LatencyTable("ab" * 32, tuple(model.task_names), tuple(model.config.input_size), "synthetic", 1,
                          round_to, tuple(calibration), 1.0, tuple(layers))


def conv_macs(model, counts: dict[str, int] | None = None) -> float:
    """Sum of conv MACs of the analysed model at `counts` kept channels (from the analytic cost model)."""
    a = analyse(model)
    return a.cost.cost("macs", a.cost.counts_vector(counts or {}))


def test_prediction_interpolates_the_table_and_follows_the_groups(model, analysis):
    table = macs_table(model, analysis)
    cost = L.latency_cost(analysis, table)
    dense = cost.latency_ns(analysis.cost.group_sizes)
    # identity calibration: ns = 1000 * us = MACs (all layers of this model are convs)
    assert dense == pytest.approx(conv_macs(model), rel=1e-6)
    half = {g.name: max(8, g.size // 2) for g in analysis.groups}
    kept = analysis.cost.counts_vector(half)
    assert cost.latency_ns(kept) == pytest.approx(analysis.cost.cost("macs", kept), rel=1e-6)
    assert cost.latency_ns(kept) < dense


def test_calibration_maps_the_sum_through_the_probes(model, analysis):
    table = macs_table(model, analysis)
    dense_sum = L.latency_cost(analysis, table).latency_ns(analysis.cost.group_sizes) / 1e6
    calibrated = dataclasses.replace(table, calibration=((dense_sum / 2, 0.9), (dense_sum, 2.0)))
    cost = L.latency_cost(analysis, calibrated)
    assert cost.predict_ms(analysis.cost.group_sizes) == pytest.approx(2.0)
    assert cost.calibrate(dense_sum * 0.75) == pytest.approx(1.45)
    assert cost.calibrate(dense_sum / 4) == pytest.approx(0.9 - 1.1 / 2)  # first segment's slope, extended
    assert cost.calibrate(1e-9) > 0


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_latency_plan_meets_the_predicted_budget_and_rounds_to_the_tables_multiple(model, analysis, budget):
    table = macs_table(model, analysis, round_to=16)
    rng = np.random.default_rng(1)
    fused = {g.name: rng.random(g.size) for g in analysis.groups}
    plan = make_plan(fused, analysis, "latency", budget, BudgetOptions(latency=table))
    assert plan.budget_kind == "latency"
    assert plan.achieved["latency_ratio_predicted"] <= budget + 1e-9
    assert plan.achieved["latency_ratio_predicted"] >= budget - 0.05
    for name, keep in plan.keep.items():
        assert len(keep) % 16 == 0 or len(keep) == analysis.sizes[name], (name, len(keep))


def test_groups_whose_pruning_saves_no_time_are_left_whole(model, analysis):
    flat_group = analysis.groups[-1].name  # a head group: its layers cost the same at every width
    table = macs_table(model, analysis, flat=frozenset({flat_group}))
    _, options = cost_for(analysis, "latency", BudgetOptions(latency=table))
    assert flat_group in options.keep_whole
    fused = {g.name: np.zeros(g.size) if g.name == flat_group else np.ones(g.size) for g in analysis.groups}
    plan = make_plan(fused, analysis, "latency", 0.5, BudgetOptions(latency=table))
    assert len(plan.keep[flat_group]) == analysis.sizes[flat_group]  # lowest scores, yet kept: pruning buys nothing
    macs_plan = make_plan(fused, analysis, "macs", 0.5)
    assert len(macs_plan.keep[flat_group]) < analysis.sizes[flat_group]


def test_latency_budget_without_a_table_or_for_another_model_is_refused(model, analysis):
    check_budget("latency", 0.5)
    fused = {g.name: np.ones(g.size) for g in analysis.groups}
    with pytest.raises(ValueError, match="latency table measured on the device"):
        make_plan(fused, analysis, "latency", 0.5)
    other = analyse(build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32)))
                    .decompose(["seg", "depth"]))
    with pytest.raises(ValueError, match="another model"):
        L.latency_cost(other, macs_table(model, analysis))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["layers"][0].update(cin=[8, 4]), "increasing"),
    (lambda d: d["layers"][0].update(us=[[1.0]]), "times are not"),
    (lambda d: d["layers"][0].update(us=[[float("nan")] * len(d["layers"][0]["cout"])] * len(d["layers"][0]["cin"])),
     "finite"),
    (lambda d: d.update(round_to=3), "round_to"),
    (lambda d: d.update(calibration=[[2.0, 1.0], [1.0, 2.0]]), "sorted"),
    (lambda d: d.update(calibration=[[1.0, -1.0]]), "finite and in"),
    (lambda d: d.update(layers=[d["layers"][0], d["layers"][0]]), "twice"),
    (lambda d: d.pop("dense_ms"), "not a latency table"),
    (lambda d: d.update(format="other/1"), "format"),
])
def test_bad_tables_are_rejected_with_the_reason(model, analysis, change, message):
    data = json.loads(macs_table(model, analysis).to_json())
    assert L.LatencyTable.from_dict(data) == macs_table(model, analysis)  # the round trip is exact
    change(data)
    with pytest.raises(ValueError, match=message):
        L.LatencyTable.from_dict(data)


@pytest.mark.parametrize("step", [4, 16])
def test_round_to_is_the_multiple_whose_counts_run_fastest(monkeypatch, step):
    # A staircase runtime: time grows with the count rounded up to `step`, plus a penalty for input
    # counts that are not multiples of 4 (what onnxruntime's blocked kernels showed on this machine).
    def fake(probes, threads, sweeps=1, runs=0, warmup=0):
        return [10.0 + (-(-cout // step)) * step + (-(-cin // step)) * step + (0 if cin % 4 == 0 else 40.0)
                for _, cin, cout in probes]

    monkeypatch.setattr(L, "layer_times", fake)
    chosen, timings = L.measure_round_to(1)
    assert chosen == step
    assert len(timings["cin"]) == len(timings["counts"])


@pytest.mark.parametrize("seed", range(5))
def test_round_to_survives_a_few_percent_of_timing_noise(monkeypatch, seed):
    # A 16-channel blocked kernel, each timing off by up to +-3% (what a drifting host gave)
    rng = np.random.default_rng(seed)

    def fake(probes, threads, sweeps=1, runs=0, warmup=0):
        return [(10.0 + (-(-cout // 16)) * 16 + (-(-cin // 16)) * 16) * rng.uniform(0.97, 1.03)
                for _, cin, cout in probes]

    monkeypatch.setattr(L, "layer_times", fake)
    assert L.measure_round_to(1)[0] == 16


def test_measured_table_covers_every_layer_and_is_cached(tmp_path, monkeypatch):
    small = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(16, 16), head_hidden=16)
                        ).decompose(["seg"]).eval()
    monkeypatch.setattr(L, "measure_round_to", lambda threads: (8, {}))
    monkeypatch.setattr(L, "PROBE_FRACTIONS", (1.0, 0.5))
    table = L.table_for(small, "cd" * 32, threads=1, cache_dir=tmp_path)
    names = {s.name for s in L.layer_specs(small)}
    assert {t.name for t in table.layers} == names
    assert table.round_to == 8 and table.threads == 1 and table.dense_ms > 0
    assert len(table.calibration) in (1, 2)
    L.latency_cost(analyse(small), table)  # fits the model it was measured on
    assert len(list(tmp_path.glob("*.json"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(L, "measure_table", boom)
    assert L.table_for(small, "cd" * 32, threads=1, cache_dir=tmp_path) == table
    with pytest.raises(AssertionError):  # another base model is another cache entry
        L.table_for(small, "ef" * 32, threads=1, cache_dir=tmp_path)


# ------------------------------------------------------------------ cutfl prune --budget latency=...


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch

    from cut.checkpoint import save_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.25, input_size=(32, 32), head_hidden=32))
    root = tmp_path_factory.mktemp("latency") / "base"
    save_model(root, model, {"dataset": "scenes", "dataset_kwargs": {"size": 32, "seed": 0},
                             "test_kwargs": {"size": 32, "seed": 1}})
    return root


SMALL = ["--train-samples", "16", "--test-samples", "8", "--num-batches", "2", "--batch-size", "4", "--quiet"]


def _prune(args, capsys):
    from cutfl.cli import main

    try:
        code = main(["prune", *args, *SMALL])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def fast_table(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTFL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(L, "measure_round_to", lambda threads: (8, {}))  # the measured multiple: tested above


def test_prune_with_a_latency_fraction_reports_asked_and_achieved(tiny_dir, tmp_path, capsys, fast_table):
    from cut.plan import PruningPlan

    out = tmp_path / "lat"
    code, stdout, err = _prune(["--model", str(tiny_dir), "--tasks", "seg,depth", "--budget", "latency=0.6",
                                "--out", str(out)], capsys)
    assert code == 0, err
    latency = json.loads(stdout)["latency"]
    assert latency["asked_fraction"] == 0.6
    assert latency["predicted_ms"] <= latency["asked_ms"] * (1 + 1e-9)
    assert latency["achieved_ms"] > 0 and latency["dense_ms_now"] > 0
    assert latency["achieved_fraction"] == pytest.approx(latency["achieved_ms"] / latency["dense_ms_now"])
    assert 1 <= len(latency["checks"]) <= L.MAX_CHECKS  # plans timed whole before recovery (check_plan)
    plan = PruningPlan.from_json((out / "plan.json").read_text())
    assert plan.budget_kind == "latency" and plan.budget_value == 0.6
    assert any(len(k) < plan.group_sizes[g] for g, k in plan.keep.items())
    assert all(len(k) % 8 == 0 or len(k) == plan.group_sizes[g] for g, k in plan.keep.items())
    assert (out / "model.onnx").is_file() and (out / "model.onnx.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["latency"]["table"]["round_to"] == 8


def test_prune_plans_from_the_table_alone_with_no_latency_checks(tiny_dir, tmp_path, capsys, fast_table):
    code, stdout, err = _prune(["--model", str(tiny_dir), "--tasks", "depth", "--budget", "latency=0.6",
                                "--latency-checks", "0", "--out", str(tmp_path / "nocheck")], capsys)
    assert code == 0, err
    latency = json.loads(stdout)["latency"]
    assert "checks" not in latency and latency["predicted_ms"] <= latency["asked_ms"] * (1 + 1e-9)


def test_prune_with_milliseconds_above_the_dense_time_prunes_nothing(tiny_dir, tmp_path, capsys, fast_table):
    code, stdout, err = _prune(["--model", str(tiny_dir), "--tasks", "depth", "--budget", "latency=100000ms",
                                "--out", str(tmp_path / "ms")], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["budget"] == {"kind": "latency", "value": 1.0}
    assert "nothing is pruned" in summary["latency"]["note"]
    assert summary["params_ratio"] == 1.0


@pytest.mark.parametrize(("budget", "fragment"), [
    ("latency=fastms", "milliseconds"),
    ("latency=-2ms", "positive"),
    ("latency=1.5", "(0, 1]"),
    ("energy=0.5", "latency=2.5ms"),
])
def test_bad_latency_budget_is_one_line(tiny_dir, tmp_path, capsys, budget, fragment):
    code, _, err = _prune(["--model", str(tiny_dir), "--tasks", "depth", "--budget", budget,
                           "--out", str(tmp_path / "x")], capsys)
    assert code != 0 and len(err) == 1 and fragment in err[0], err


# ------------------------------------------------------------------ the federation: profile, wire, server plan


def small_table(model, analysis, sha: str = "ab" * 32):
    """A consistent synthetic table: its dense_ms is what it predicts for the dense model."""
    table = dataclasses.replace(macs_table(model, analysis, round_to=16), base_model_sha256=sha)
    dense = L.latency_cost(analysis, table).predict_ms(analysis.cost.group_sizes)
    return dataclasses.replace(table, dense_ms=dense)


def test_a_latency_profile_travels_with_its_table_and_bad_ones_are_refused(model, analysis):
    from cut import wire
    from cut.messages import Budget, TaskProfile, ValidationError

    table = small_table(model, analysis)
    profile = TaskProfile("cam-1", ("seg", "depth"), Budget("latency", 1.0, milliseconds=5.0, latency_table=table))
    back = wire.decode_profile(wire.encode_profile(profile), known_tasks=("seg", "depth", "normals"))
    assert back == profile and back.budget.latency_table.layers == table.layers
    bad = {
        "needs the latency table": Budget("latency", 0.5),
        "belong to a latency budget": Budget("params", 0.5, milliseconds=5.0),
        "finite number": Budget("latency", 0.5, milliseconds=float("nan"), latency_table=table),
        "non-printable": Budget("latency", 0.5, latency_table=dataclasses.replace(
            table, layers=(dataclasses.replace(table.layers[0], name="a\nb"), *table.layers[1:]))),
    }
    for reason, budget in bad.items():
        with pytest.raises(ValidationError, match=f"TaskProfile.budget.*{reason}"):
            wire.encode_profile(TaskProfile("cam-1", ("seg", "depth"), budget))
    with pytest.raises(ValidationError, match="measured for tasks"):
        wire.encode_profile(TaskProfile("cam-1", ("seg",), Budget("latency", 0.5, latency_table=table)))
    # A table whose times do not fill its grid is refused on decoding.
    from cut.proto import cutfl_pb2 as pb

    msg = pb.TaskProfile.FromString(wire.encode_profile(profile))
    del msg.budget.latency_table.layers[0].us[:]
    with pytest.raises(ValidationError, match="times for a"):
        wire.decode_profile(msg.SerializeToString())


def server_base(tmp_path, model):
    """The server's view of `model` saved as a base model: (BaseModel, seg+depth, a consistent synthetic table
    for its decomposed model, random per-task scores as the server aggregates them: task -> group -> vector)."""
    from cut.checkpoint import save_model
    from server.planning import BaseModel

    full = build_model(ModelConfig(tasks=scene_tasks(), width=0.25, input_size=(32, 32)))
    full.load_state_dict(model.state_dict(), strict=False)
    save_model(tmp_path / "base", full, {"dataset": "scenes"})
    base = BaseModel.load(tmp_path / "base")
    tasks = base.canonical(("seg", "depth"))
    analysis = base.analysis(tasks)
    rng = np.random.default_rng(0)
    scores = {t: {g.name: rng.random(g.size) for g in analysis.groups_of_task(t)} for t in tasks}
    return base, tasks, small_table(base.decomposed(tasks), analysis, sha=base.sha256), scores


def test_the_server_plans_a_device_latency_budget_against_its_table(tmp_path, model, analysis):
    from cut.messages import Budget
    from server.planning import PlanBook

    base, tasks, table, per_task = server_base(tmp_path, model)
    book = PlanBook(base, BudgetOptions(round_to=4, min_channels=4))
    dense_ms = L.latency_cost(base.analysis(tasks), table).predict_ms(base.analysis(tasks).cost.group_sizes)
    key = (tasks, "latency", 1.0, ())
    plan = book.plan(tasks, Budget("latency", 1.0, milliseconds=dense_ms * 0.5, latency_table=table), per_task, {},
                     key)
    assert plan.budget_kind == "latency" and plan.budget_value == pytest.approx(0.5 * dense_ms / table.dense_ms)
    assert plan.achieved["latency_ms_predicted"] <= dense_ms * 0.5 * (1 + 1e-9)
    assert all(len(k) % 16 == 0 or len(k) == plan.group_sizes[g] for g, k in plan.keep.items())  # table's multiple
    other = dataclasses.replace(table, runtime="another phone")
    second = book.plan(tasks, Budget("latency", 1.0, milliseconds=dense_ms * 0.5, latency_table=other), per_task, {},
                       key)
    assert second is not plan  # another table is another plan, even under the same cache key
    assert book.plan(tasks, Budget("latency", 1.0, milliseconds=dense_ms * 0.5, latency_table=table), per_task, {},
                     key) is plan
    with pytest.raises(ValueError, match="measured for base model"):
        book.plan(tasks, Budget("latency", 0.5, latency_table=dataclasses.replace(table, base_model_sha256="cd" * 32)),
                  per_task, {})


def test_a_device_measures_its_table_from_the_servers_architecture(tmp_path, monkeypatch):
    from client.device import device_from_node_config
    from client.latency import measured_budget
    from cut.messages import Budget, ValidationError
    from protocol.phases import ProfileConfig

    monkeypatch.setattr(L, "measure_round_to", lambda threads: (8, {}))
    monkeypatch.setattr(L, "PROBE_FRACTIONS", (1.0, 0.5))
    device = device_from_node_config({"tasks": "depth", "budget": "latency=5ms", "latency-threads": 1}, None)
    assert device.budget == Budget("latency", 1.0, milliseconds=5.0)
    arch = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(16, 16), head_hidden=16)).config
    config = ProfileConfig(architecture=arch.to_json(), base_model_sha256="ef" * 32)
    budget = measured_budget(device.budget, device.tasks, config, device.latency_threads, str(tmp_path))
    assert budget.milliseconds == 5.0 and budget.latency_table.tasks == ("depth",)
    assert budget.latency_table.base_model_sha256 == "ef" * 32
    assert list((tmp_path / "latency").glob("*.json"))  # cached in the device's store
    budget.validate()
    assert measured_budget(Budget("params", 0.5), ("depth",), config) == Budget("params", 0.5)
    with pytest.raises(ValidationError, match="architecture"):
        measured_budget(device.budget, device.tasks, ProfileConfig())


@pytest.mark.slow
def test_a_federation_device_with_a_latency_budget_gets_a_plan_within_its_milliseconds(tmp_path, monkeypatch):
    """A simulated device declares latency=...ms: it measures its table at the profile query, the server
    plans against it; a params device beside it is planned as before."""
    from test_federation import scenario_file, tiny_model_dir

    from simulations.runner import run_scenario

    monkeypatch.setenv("CUTFL_CACHE", str(tmp_path / "cache"))
    base = tiny_model_dir(tmp_path)
    devices = {0: {"tasks": ["seg", "depth"], "budget_kind": "latency", "budget": 0.9},
               1: {"tasks": ["depth"], "class": "small"}}
    summary = run_scenario(scenario_file(tmp_path, base, rounds=0, devices=devices), out_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    entries = {d["device_id"]: d for d in report["devices"]}
    assert summary["devices_ok"] == 2, [d["reason"] for d in report["devices"]]
    latency = entries["device-0000"]
    assert latency["budget_kind"] == "latency" and latency["budget"] == 0.9
    assert 0 < latency["latency_ratio_predicted"] <= 0.9 + 1e-9  # this tiny model cannot go below ~0.79
    assert latency["macs_ratio"] < 1.0  # pruned
    assert entries["device-0001"]["params_ratio"] <= 0.5 + 1e-9
    assert report["summary"]["all_within_budget"]
    # the device timed its delivered model beside its dense one when it arrived; the params device did not
    assert latency["latency_ms_measured"] > 0 and 0 < latency["latency_ratio_measured"] < 1.5
    assert latency["latency_error_measured"] == pytest.approx(latency["latency_ratio_measured"] / 0.9 - 1)
    assert entries["device-0001"]["latency_ms_measured"] is None
    assert report["summary"]["latency_error_measured"]["n"] == 1
    assert "Latency budgets (timed on each device" in (tmp_path / "out" / "report.md").read_text()


def test_a_measured_plan_joins_the_calibration_in_order_and_replaces_one_at_its_sum(model, analysis):
    table = dataclasses.replace(macs_table(model, analysis), calibration=((1.0, 1.1), (3.0, 3.2), (9.0, 9.9)),
                                probes=(0.3, 0.5, 1.0))
    checked = L.with_measured_point(table, 2.0, 2.6)
    assert checked.calibration == ((1.0, 1.1), (2.0, 2.6), (3.0, 3.2), (9.0, 9.9))
    assert checked.probes == (0.3, -1.0, 0.5, 1.0)
    again = L.with_measured_point(checked, 2.0, 2.4)  # the same plan timed again: its point moves
    assert again.calibration[1] == (2.0, 2.4) and len(again.calibration) == 4
    assert L.latency_cost(analysis, checked).calibrate(2.0) == pytest.approx(2.6)
    full = table
    for i in range(L.MAX_CALIBRATION + 2):  # never more points than a table may carry; the probes stay
        full = L.with_measured_point(full, 4.0 + i * 0.5, 5.0 + i * 0.5)
    assert len(full.calibration) == L.MAX_CALIBRATION
    assert {(1.0, 1.1), (3.0, 3.2), (9.0, 9.9)} <= set(full.calibration)
    assert L.LatencyTable.from_dict(json.loads(full.to_json())) == full


def test_a_measured_plan_scales_the_probes_curve_around_it_and_the_dense_model_stays(model, analysis):
    """A plan timed faster (or slower) than the probes predict moves the calibration near its sum by that
    factor, fading to none at the dense model; the probes keep the curve's shape."""
    table = dataclasses.replace(macs_table(model, analysis), calibration=((1.0, 1.1), (3.0, 3.2), (9.0, 9.9)),
                                probes=(0.3, 0.5, 1.0))
    before = L.latency_cost(analysis, table)
    faster = L.with_measured_point(table, 2.9, 2.5)
    assert faster.calibration == ((1.0, 1.1), (2.9, 2.5), (3.0, 3.2), (9.0, 9.9))  # the points as measured
    cost = L.latency_cost(analysis, faster)
    factor = 2.5 / before.calibrate(2.9)
    assert cost.calibrate(2.9) == pytest.approx(2.5)
    assert cost.calibrate(1.0) == pytest.approx(1.1 * factor)  # held below the plan
    assert cost.calibrate(3.0) == pytest.approx(3.2 * np.interp(3.0, [2.9, 9.0], [factor, 1.0]))
    assert cost.calibrate(3.0) - cost.calibrate(2.9) < 0.2  # no step up to the probe right after the plan
    assert cost.calibrate(9.0) == pytest.approx(9.9)
    slower = L.latency_cost(analysis, L.with_measured_point(table, 2.0, 3.5))
    assert slower.calibrate(2.0) == pytest.approx(3.5) and slower.calibrate(3.0) > 3.2
    assert slower.calibrate(9.0) == pytest.approx(9.9)
    grid = np.linspace(0.5, 10, 60)
    for c in (cost, slower):
        assert np.all(np.diff([c.calibrate(x) for x in grid]) >= -1e-12)  # monotone, as the planner assumes
    noisy = L.latency_cost(analysis, L.with_measured_point(table, 8.0, 10.5))  # slower than dense: capped
    assert noisy.calibrate(9.0) == pytest.approx(9.9) and noisy.calibrate(8.0) <= 9.9 + 1e-9
    assert L.with_measured_point(table, 9.0, 9.0) == table  # the dense model itself: nothing to add


def test_a_plan_measured_beside_a_probe_it_disagrees_with_can_be_widened():
    """The simulated fleet's case: a three-task plan at 0.7 measured 7% faster than predicted, its sum just
    below the 0.75 probe's. Inserted as a plain point, the calibration rose almost vertically from the plan to
    the probe, so planning again at 0.7 gave the same plan; scaled, the budget reaches further."""
    probes = ((0.134337, 0.125297), (0.158163, 0.144951), (0.271604, 0.250383), (0.468927, 0.494197),
              (0.682935, 0.705276))
    plan = (0.461737, 0.450754)
    cost = L.LatencyCost(None, [], (*probes[:3], plan, *probes[3:]), (0.15, 0.3, 0.5, -1.0, 0.75, 1.0))
    target = 0.7 * 0.705276
    reach = next(x for x in np.linspace(plan[0], probes[-1][0], 2000) if cost.calibrate(x) > target)
    assert reach > 0.48  # the plan's sum was 0.462: a wider plan fits the budget
    plain = L.LatencyCost(None, [], (*probes[:3], plan, *probes[3:]))  # every point a probe: the old rule
    assert next(x for x in np.linspace(plan[0], probes[-1][0], 2000) if plain.calibrate(x) > target) < 0.47


def _fake_timing(monkeypatch, slowdown):
    """Export writes the model's MACs; timing returns dense 1 ms and each plan slowdown(its MAC fraction)."""
    import cut.export
    from cut.models import count_macs

    monkeypatch.setattr(cut.export, "export_onnx", lambda m, path, **kw: path.write_text(str(count_macs(m))))
    timed = []

    def fake_ms(paths, threads=1, rounds=6, runs=8):
        macs = [float(p.read_text()) for p in paths]
        timed.append(macs[1] / macs[0])
        return [1.0] + [slowdown(m / macs[0]) for m in macs[1:]]
    monkeypatch.setattr(L, "interleaved_ms", fake_ms)
    return timed


@pytest.mark.parametrize("slowdown, checks", [(lambda f: f, 1), (lambda f: min(1.0, 1.2 * f), L.MAX_CHECKS)])
def test_check_plan_corrects_the_calibration_until_the_plan_measures_within_tolerance(model, analysis, monkeypatch,
                                                                                     slowdown, checks):
    fake = _fake_timing(monkeypatch, slowdown)
    table = macs_table(model, analysis)  # predicts MACs exactly: time = MACs here unless slowed down
    rng = np.random.default_rng(0)
    fused = {g.name: rng.random(g.size) for g in analysis.groups}

    def plan_for(t):
        return make_plan(fused, analysis, "latency", 0.5, BudgetOptions(latency=t))

    checked, plan, history = L.check_plan(model, table, plan_for, 0.5)
    assert len(fake) == L.REPEATS * len(history) and (len(history) == 1 if checks == 1 else 2 <= len(history) <= checks)
    assert history[0].predicted_fraction == pytest.approx(0.5, abs=0.05)
    assert history[-1].measured_fraction <= 0.5 * (1 + L.CHECK_TOLERANCE)
    assert history[-1].measured_fraction >= 0.5 * (1 - 2 * L.CHECK_TOLERANCE)
    assert plan_for(checked).keep == plan.keep  # planning again with the returned table gives the returned plan
    assert (-1.0 in checked.probes) == (len(history) > 1)
    if checks > 1:  # the first plan measured 20% slow: the one kept has fewer MACs
        assert history[0].measured_fraction == pytest.approx(1.2 * fake[0])
        assert fake[-1] < fake[0]


def latency_device(tmp_path, model, monkeypatch, fraction=0.6, state=None):
    """One device with a latency budget of `fraction`, planned by the server (after restoring its kept timings
    from `state`, a RunState, if given); the exchange faked. Returns (app module, ledger, its record, book, base,
    aggregated, settings, deliveries: the node sets delivered to)."""
    import server.app as app
    from cut.messages import Budget, TaskProfile
    from server.ledger import Ledger
    from server.planning import PlanBook
    from server.settings import load_settings

    base, tasks, table, aggregated = server_base(tmp_path, model)
    settings = load_settings("default")
    book = PlanBook(base, BudgetOptions(round_to=4, min_channels=4))
    ledger = Ledger([7])
    record = ledger.records[7]
    record.device_id, record.tasks = "phone", tasks
    record.profile = TaskProfile("phone", tasks, Budget("latency", fraction, latency_table=table))
    if state is not None:
        app.restore_latency_timings(ledger, state, base)
    assert app.plan_device(record, ledger, settings, base, book, aggregated)
    deliveries = []
    monkeypatch.setattr(app, "recover_plans", lambda *a, **k: {})
    return app, ledger, record, book, base, aggregated, settings, deliveries


def device_times(book, deliveries, slowdown):
    """A fake deliver: the device times each model it receives at `slowdown(plan)` x its table's prediction."""
    def deliver(grid, ledger, settings, book_, only=None):
        deliveries.append(set(only))
        for r in ledger.active():
            plan = book.builds[r.plan_hash].plan
            r.sizes["latency_ms"] = slowdown(plan) * plan.achieved["latency_ratio_predicted"]
    return deliver


def kept_channels(plan) -> int:
    return sum(map(len, plan.keep.values()))


def test_the_server_plans_again_a_device_whose_delivered_model_measured_over_its_budget(tmp_path, model, monkeypatch):
    """server.app.recheck_latency: the device's deliver reply timed its model 25% over its fraction; the
    measurement joins its table, it gets a faster plan, delivered again, and then it fits."""
    from cut.messages import Budget
    from server.planning import measured_budget, over_latency

    app, ledger, record, book, base, aggregated, settings, deliveries = latency_device(tmp_path, model, monkeypatch)
    analysis = base.analysis(record.tasks)
    first = book.builds[record.plan_hash].plan
    predicted = first.achieved["latency_ratio_predicted"]
    record.sizes.update(latency_ms=1.25 * predicted, latency_dense_ms=1.0)  # the device: 25% slower than its table
    assert over_latency(record.profile.budget, 1.25 * predicted, 1.0)
    assert not over_latency(record.profile.budget, 0.6, 1.0) and not over_latency(Budget("params", 0.5), 9.0, 1.0)
    corrected = measured_budget(record.profile.budget, analysis, first, 1.25 * predicted)
    assert L.latency_cost(analysis, corrected.latency_table).predict_ms(
        analysis.cost.counts_vector({g: len(k) for g, k in first.keep.items()})) == pytest.approx(
        1.25 * predicted * record.profile.budget.latency_table.dense_ms, rel=1e-4)  # it predicts what was measured

    # the device times its new model as its corrected table predicts
    monkeypatch.setattr(app, "deliver_models", device_times(book, deliveries, lambda plan: 1.0))
    out = app.recheck_latency(None, ledger, settings, base, book, aggregated, None)
    assert out["rounds"] == 1 and out["replanned"] == 1 and out["over_at_end"] == 0 and deliveries == [{7}]
    assert record.plan_hash != first.plan_hash and record.ok and "reverted" not in out
    assert kept_channels(book.builds[record.plan_hash].plan) < kept_channels(first)  # fewer channels: faster
    assert -1.0 in record.profile.budget.latency_table.probes


def test_the_server_plans_again_a_device_whose_model_measured_well_under_its_budget(tmp_path, model, monkeypatch):
    """Measured 40% faster than its table said: the device could run a wider model in its time, so it gets one
    (more channels), and that one is not over its budget. (The small test model's only prunable step costs 9%
    of its dense time, so a smaller miss leaves nothing to add.)"""
    from server.planning import off_latency, over_latency

    app, ledger, record, book, base, aggregated, settings, deliveries = latency_device(tmp_path, model, monkeypatch)
    first = book.builds[record.plan_hash].plan
    predicted = first.achieved["latency_ratio_predicted"]
    record.sizes.update(latency_ms=0.6 * predicted, latency_dense_ms=1.0)
    assert off_latency(record.profile.budget, 0.6 * predicted, 1.0)
    assert not over_latency(record.profile.budget, 0.6 * predicted, 1.0)
    assert not off_latency(record.profile.budget, 0.6 * 1.02, 1.0) and not off_latency(record.profile.budget, 0.59, 1.0)
    assert not off_latency(record.profile.budget, 0.6 * 0.95, 1.0)  # 5% under: within a device's timing noise
    assert off_latency(record.profile.budget, 0.6 * 0.93, 1.0) and off_latency(record.profile.budget, 0.6 * 1.04, 1.0)
    monkeypatch.setattr(app, "deliver_models", device_times(book, deliveries, lambda plan: 0.6))
    out = app.recheck_latency(None, ledger, settings, base, book, aggregated, None)
    assert out["replanned"] >= 1 and out["over_at_end"] == 0 and deliveries[0] == {7}, out
    assert kept_channels(book.builds[record.plan_hash].plan) > kept_channels(first)  # more channels in its time
    assert record.sizes["latency_ms"] <= 0.6 * (1 + L.CHECK_TOLERANCE)


def test_a_device_whose_new_plan_measured_over_gets_back_the_earlier_plan_that_fitted(tmp_path, model, monkeypatch):
    """The first plan measured 40% under; every wider plan measures 2x what its table says: after the checks the
    device holds the first plan again (delivered again), not a plan over its budget."""
    app, ledger, record, book, base, aggregated, settings, deliveries = latency_device(tmp_path, model, monkeypatch)
    first = book.builds[record.plan_hash].plan
    predicted = first.achieved["latency_ratio_predicted"]
    record.sizes.update(latency_ms=0.6 * predicted, latency_dense_ms=1.0)
    wider = lambda plan: 2.0 if kept_channels(plan) > kept_channels(first) else 0.6  # noqa: E731
    monkeypatch.setattr(app, "deliver_models", device_times(book, deliveries, wider))
    out = app.recheck_latency(None, ledger, settings, base, book, aggregated, None)
    assert out["replanned"] >= 1 and out["reverted"] == 1 and deliveries[-1] == {7}
    assert record.plan_hash == first.plan_hash and out["over_at_end"] == 0
    assert len(deliveries) == out["rounds"] + 1


def test_a_device_whose_every_plan_measured_over_ends_with_the_one_least_over(tmp_path, model, monkeypatch):
    """The first plan measured 20% over its table's prediction, every faster plan twice its prediction: no plan
    fits, so after the checks the device holds the plan measured least over (as cut.latency.check_plan keeps),
    delivered again, and is still counted over."""
    app, ledger, record, book, base, aggregated, settings, deliveries = latency_device(tmp_path, model, monkeypatch)
    first = book.builds[record.plan_hash].plan
    predicted = first.achieved["latency_ratio_predicted"]
    record.sizes.update(latency_ms=1.2 * predicted, latency_dense_ms=1.0)
    slower = lambda plan: 1.2 if plan.plan_hash == first.plan_hash else 2.0  # noqa: E731
    monkeypatch.setattr(app, "deliver_models", device_times(book, deliveries, slower))
    out = app.recheck_latency(None, ledger, settings, base, book, aggregated, None)
    assert out["replanned"] >= 1 and out["reverted"] == 1 and deliveries[-1] == {7}
    assert record.plan_hash == first.plan_hash and out["over_at_end"] == 1
    assert record.sizes["latency_ms"] == pytest.approx(1.2 * predicted)


def test_a_restarted_server_plans_a_latency_device_with_the_timings_its_checks_had_kept(tmp_path, model, monkeypatch):
    """The checks timed a device's plans 40% under its table and gave it wider ones; the server restarts on the same
    run directory and the device sends its profile (its table as measured) again: it is planned with those timings
    in its calibration from the start, and its earlier plans count as tried."""
    from server.rundir import RunState

    app, ledger, record, book, base, aggregated, settings, deliveries = latency_device(tmp_path, model, monkeypatch)
    first = book.builds[record.plan_hash].plan
    record.sizes.update(latency_ms=0.6 * first.achieved["latency_ratio_predicted"], latency_dense_ms=1.0)
    state = RunState(tmp_path / "run", base.sha256, "latency", resume=False)
    monkeypatch.setattr(app, "deliver_models", device_times(book, deliveries, lambda plan: 0.6))
    app.recheck_latency(None, ledger, settings, base, book, aggregated, state)
    timed = list(record.latency_timings)
    assert timed and timed[0][0] == first.plan_hash and record.plan_hash != first.plan_hash

    resumed = RunState(tmp_path / "run", base.sha256, "latency", resume=True)
    assert resumed.kept_latency_timings("phone") == record.latency_timings
    _, _, again, book2, *_ = latency_device(tmp_path, model, monkeypatch, state=resumed)
    assert again.latency_timings == record.latency_timings
    assert again.profile.budget.latency_table.calibration == record.profile.budget.latency_table.calibration
    # (latency_device saved the base model again: other weights in the unused heads, so other plan hashes)
    resumed_plan = book2.builds[again.plan_hash].plan
    assert resumed_plan.keep == app.device_plan(record.profile, record, settings, book, aggregated).keep
    assert resumed_plan.keep != first.keep  # not back to the plan the table alone gives

    (tmp_path / "run" / "state" / "latency" / "phone.json").write_text("[[\"x\", NaN, 1.0]]")  # damaged: checked anew
    assert RunState(tmp_path / "run", base.sha256, "latency", resume=True).kept_latency_timings("phone") == []
    (tmp_path / "run" / "state" / "latency" / "phone.json").write_text(json.dumps([list(t) for t in timed]))
    assert RunState(tmp_path / "run", base.sha256, "latency", resume=False).kept_latency_timings("phone") == []


def test_timed_fraction_keeps_the_timing_of_median_fraction(monkeypatch):
    timings = iter([[1.0, 0.56], [1.2, 0.60], [0.9, 0.54]])  # fractions 0.56, 0.50, 0.60
    calls = []

    def fake_ms(paths, threads=1, rounds=6, runs=8):
        calls.append((tuple(paths), threads, rounds, runs))
        return next(timings)
    monkeypatch.setattr(L, "interleaved_ms", fake_ms)
    assert L.timed_fraction("dense.onnx", "plan.onnx", 2, repeats=3) == (1.0, 0.56)
    assert calls == [(("dense.onnx", "plan.onnx"), 2, 12, 10)] * 3
    monkeypatch.setattr(L, "interleaved_ms", lambda *a, **k: [1.0, 0.7])
    assert L.timed_fraction("d", "p", repeats=0) == (1.0, 0.7)  # at least one timing
