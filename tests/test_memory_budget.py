"""Memory budgets (cut.memory): the figure against an independent oracle, plans within the budget, the
built compact model measuring what the planner predicted, parsing, the wire, the server and `cutfl prune`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_latency import _prune, tiny_dir  # noqa: F401  (the tiny saved model `cutfl prune` runs on)

from cut.budget import BudgetOptions, cost_for, group_allowed, make_plan
from cut.compact import compact_model
from cut.data.scenes import scene_tasks
from cut.groups import analyse
from cut.memory import MemoryCost, memory_cost, memory_fraction, model_memory, parse_memory_budget, parse_size
from cut.models import ModelConfig, build_model
from cut.tasks import TaskSpec

SHA = "ab" * 32


def small_model(backbone: str = "resnet18", tasks=("seg", "depth", "kind")):
    """64x64 inputs and thin layers, so activations are a sizeable part of the memory (not just weights)."""
    torch.manual_seed(0)
    cfg = ModelConfig(tasks=scene_tasks() + (TaskSpec("kind", "classification", num_classes=4),), backbone=backbone,
                      width=0.125 if backbone != "mobilenet_v2" else 0.25, input_size=(64, 64), head_hidden=16,
                      cls_hidden=16)
    return build_model(cfg).decompose(list(tasks)).eval()


def oracle_memory(model) -> int:
    """4 bytes a parameter + 4 bytes an element of the largest (input + output) of any Conv2d / Linear,
    from this test's own hooks and forward pass."""
    sizes = []
    hooks = [m.register_forward_hook(lambda mod, i, o: sizes.append(i[0].numel() + o.numel()))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *model.config.input_size))
    finally:
        for h in hooks:
            h.remove()
    return 4 * sum(p.numel() for p in model.parameters()) + 4 * max(sizes)


def scores(analysis, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.name: rng.random(g.size) for g in analysis.groups}


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def model(request):
    return small_model(request.param)


def test_dense_memory_is_weights_plus_the_peak_of_an_independent_oracle(model):
    cost = memory_cost(analyse(model))
    expected = oracle_memory(model)
    assert cost.dense("memory") == expected
    measured = model_memory(model)
    assert measured["memory_bytes"] == expected
    assert measured["weight_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert measured["activation_bytes"] == cost.peak_bytes(cost.group_sizes) > 0
    assert measured["activation_bytes"] > 0.02 * expected  # this model tests the activation term, not only weights
    # A budget kind of its own: params and MACs pass through to the analytic model.
    planned, _ = cost_for(analyse(model), "memory", BudgetOptions())
    assert isinstance(planned, MemoryCost)
    assert planned.cost("params", planned.group_sizes) == analyse(model).cost.dense("params")


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_a_memory_plan_is_within_its_budget_and_close_to_it(model, budget):
    analysis = analyse(model)
    plan = make_plan(scores(analysis, int(budget * 10)), analysis, "memory", budget, base_model_sha256=SHA)
    cost = memory_cost(analysis)
    kept = cost.counts_vector({g: len(k) for g, k in plan.keep.items()})
    reached = cost.cost("memory", kept) / cost.dense("memory")
    assert reached <= budget
    # As close as the granularity allows: no group's next allowed count fits any more ...
    allowed = group_allowed(cost, BudgetOptions())
    for j, g in enumerate(cost.group_names):
        bigger = allowed[g][allowed[g] > kept[j]]
        if len(bigger):
            assert cost.cost("memory", np.where(np.arange(len(kept)) == j, bigger[0], kept)) > budget * cost.dense(
                "memory"), g
    # ... which on the ResNet is within a few points (the thin MobileNet's last free steps are 8 -> 16 channels
    # of head branches, so a params plan stops short there too: 0.63 at params 0.7).
    if model.config.backbone == "resnet18":
        assert reached >= budget - 0.03
    assert plan.achieved["memory_ratio"] == pytest.approx(reached)
    assert plan.achieved["memory_bytes"] == cost.cost("memory", kept)
    assert plan.achieved["params_ratio"] < 1 and plan.budget_kind == "memory"


@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_the_built_compact_model_measures_what_the_planner_predicted(model, budget):
    analysis = analyse(model)
    plan = make_plan(scores(analysis, 3), analysis, "memory", budget, BudgetOptions(round_to=2, min_channels=2), SHA)
    compact = compact_model(model, plan).eval()
    measured = model_memory(compact)
    assert measured["memory_bytes"] == plan.achieved["memory_bytes"]
    assert measured["activation_bytes"] == plan.achieved["activation_bytes"]
    assert memory_cost(analyse(compact)).dense("memory") == measured["memory_bytes"] == oracle_memory(compact)


def test_the_peak_is_a_max_over_layers_and_ranking_uses_the_additive_figure(model):
    cost = memory_cost(analyse(model))
    full = cost.group_sizes
    acts = cost.activation_bytes(full)
    assert cost.peak_bytes(full) == acts.max() and cost.rank_cost("memory", full) == cost.weight_bytes(full) + acts.sum()
    # Every count only makes memory grow (what the planner's searches assume).
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = np.floor(rng.uniform(0.3, 1.0, len(full)) * full)
        b = np.minimum(full, a + rng.integers(0, 3, len(full)))
        assert cost.cost("memory", a) <= cost.cost("memory", b)


# ------------------------------------------------------------------------------ sizes and parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("0.5", (0.5, 0.0)), ("1", (1.0, 0.0)), ("3MB", (1.0, 3e6)), ("512KiB", (1.0, 524288.0)),
    ("1.5e3 kb", (1.0, 1.5e6)), ("2GB", (1.0, 2e9)), ("100B", (1.0, 100.0)), ("1TB", (1.0, 1e12)),
])
def test_memory_budgets_parse(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("0", "fraction in (0, 1]"), ("1.5", "fraction in (0, 1]"), ("nan", "fraction in (0, 1]"),
    ("-1MB", "positive number of bytes"), ("0MB", "positive number of bytes"), ("abc", "neither a fraction"),
    ("3XB", "a number and a unit"), ("x3MB", "neither a fraction"), ("", "neither a fraction"),
    ("2000TB", "above the largest size"),
])
def test_bad_memory_budgets_are_refused_with_the_reason(text, fragment):
    with pytest.raises(ValueError, match="memory budget") as e:
        parse_memory_budget(text)
    assert fragment in str(e.value)


def test_the_python_api_takes_a_memory_fraction():
    from cut.api import parse_budget

    assert parse_budget("memory=0.5") == ("memory", 0.5)
    with pytest.raises(ValueError, match="memory_fraction"):  # a size needs the model: the hint says how
        parse_budget("memory=3MB")
    with pytest.raises(ValueError, match="budget value"):
        parse_budget(("memory", 0.0))


def test_sizes_become_fractions_of_the_dense_memory_or_are_refused():
    analysis = analyse(small_model(tasks=("seg", "depth")))
    dense = memory_cost(analysis).dense("memory")
    assert memory_fraction(analysis, dense / 2) == pytest.approx(0.5)
    assert memory_fraction(analysis, 10 * dense) == 1.0  # at or above dense: nothing is pruned
    with pytest.raises(ValueError, match="unreachable: the smallest model .* needs"):
        memory_fraction(analysis, 1000)
    assert parse_size("3 MiB") == 3 * 2**20


# ------------------------------------------------------------------------------ device, wire, server


def test_a_device_declares_a_memory_budget_and_it_travels():
    from client.device import device_from_node_config
    from cut import wire
    from cut.messages import Budget, TaskProfile, ValidationError

    device = device_from_node_config({"tasks": "seg,depth", "budget": "memory=3MB"}, None)
    assert device.budget == Budget("memory", 1.0, memory_bytes=3e6)
    assert device_from_node_config({"tasks": "seg", "budget": "memory=0.4"}, None).budget == Budget("memory", 0.4)
    with pytest.raises(ValueError, match="device: memory budget 'abc'"):
        device_from_node_config({"tasks": "seg", "budget": "memory=abc"}, None)
    profile = device.profile(10)
    assert wire.decode_profile(wire.encode_profile(profile), known_tasks=("seg", "depth")) == profile
    bad = {"belong to a memory budget": Budget("params", 0.5, memory_bytes=5e6),
           "memory_bytes": Budget("memory", 1.0, memory_bytes=float("nan")),
           "must be 0 or a number": Budget("memory", 1.0, memory_bytes=0.5)}
    for reason, budget in bad.items():
        with pytest.raises(ValidationError, match=f"TaskProfile.budget.*{reason}"):
            wire.encode_profile(TaskProfile("cam-1", ("seg",), budget))
    analysis = analyse(small_model(tasks=("seg", "depth")))
    plan = make_plan(scores(analysis), analysis, "memory", 0.5, base_model_sha256=SHA)
    back = wire.decode_plan(wire.encode_plan(plan))
    assert back.budget_kind == "memory" and back.achieved["memory_ratio"] == plan.achieved["memory_ratio"]


def test_the_server_plans_a_memory_budget_in_bytes(tmp_path):
    from cut.checkpoint import save_model
    from cut.messages import Budget
    from server.planning import BaseModel, PlanBook
    from server.report import within_budget

    full = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(64, 64), head_hidden=16))
    save_model(tmp_path / "base", full, {"dataset": "scenes"})
    base = BaseModel.load(tmp_path / "base")
    tasks = base.canonical(("depth", "seg"))
    dense = memory_cost(base.analysis(tasks)).dense("memory")
    rng = np.random.default_rng(0)
    per_task = {t: {g.name: rng.random(g.size) for g in base.analysis(tasks).groups_of_task(t)} for t in tasks}
    book = PlanBook(base, BudgetOptions(round_to=4, min_channels=4))
    key = (tasks, "memory", 1.0, ())
    plan = book.plan(tasks, Budget("memory", 1.0, memory_bytes=0.5 * dense), per_task, {}, key)
    assert plan.budget_kind == "memory" and plan.budget_value == pytest.approx(0.5)
    assert plan.achieved["memory_bytes"] <= 0.5 * dense
    other = book.plan(tasks, Budget("memory", 1.0, memory_bytes=0.7 * dense), per_task, {}, key)
    assert other is not plan and other.achieved["memory_bytes"] > plan.achieved["memory_bytes"]  # bytes in the key
    build = book.build(plan)
    assert model_memory(book.model(build.plan.plan_hash))["memory_bytes"] == plan.achieved["memory_bytes"]
    assert book.plan(tasks, Budget("memory", 1.0, memory_bytes=1e12), per_task, {}).pruned_groups() == {}
    with pytest.raises(ValueError, match="unreachable"):
        book.plan(tasks, Budget("memory", 1.0, memory_bytes=100.0), per_task, {})
    entry = {"budget_kind": "memory", "budget": 1.0, "budget_bytes": 0.5 * dense,
             "memory_bytes": plan.achieved["memory_bytes"], "memory_ratio": plan.achieved["memory_ratio"]}
    assert within_budget(entry) and not within_budget({**entry, "budget_bytes": 0.4 * dense})
    assert within_budget({**entry, "budget": 0.5, "budget_bytes": None})
    assert not within_budget({**entry, "budget": 0.45, "budget_bytes": None})


# ------------------------------------------------------------------------------ cutfl prune --budget memory=...


def test_prune_with_a_memory_fraction_reports_reached_memory(tiny_dir, tmp_path, capsys):  # noqa: F811
    from cut.checkpoint import load_model
    from cut.plan import PruningPlan

    out = tmp_path / "mem"
    code, stdout, err = _prune(["--model", str(tiny_dir), "--tasks", "seg,depth", "--budget", "memory=0.5",
                                "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["budget"] == {"kind": "memory", "value": 0.5}
    assert 0.45 <= summary["memory_ratio"] <= 0.5
    block = summary["memory_budget"]
    assert block["achieved_bytes"] == block["predicted_bytes"] == summary["memory"]
    assert block["achieved_fraction"] == pytest.approx(summary["memory_ratio"])
    assert block["asked_bytes"] == pytest.approx(0.5 * block["dense_bytes"])
    plan = PruningPlan.from_json((out / "plan.json").read_text())
    assert plan.budget_kind == "memory" and plan.achieved["memory_ratio"] <= 0.5
    compact, _ = load_model(out)
    assert model_memory(compact)["memory_bytes"] == summary["memory"]
    report = json.loads((out / "report.json").read_text())
    assert report["memory_budget"]["peak_layer"] and report["dense"]["memory"] == block["dense_bytes"]

    asked = int(0.6 * block["dense_bytes"])
    code, stdout, err = _prune(["--model", str(tiny_dir), "--tasks", "seg,depth", "--budget", f"memory={asked}B",
                                "--out", str(tmp_path / "bytes")], capsys)
    assert code == 0, err
    block = json.loads(stdout)["memory_budget"]
    assert block["asked_bytes"] == asked and "asked_fraction" not in block
    assert 0.9 * asked <= block["achieved_bytes"] <= asked


def test_prune_with_a_size_above_the_dense_memory_prunes_nothing(tiny_dir, tmp_path, capsys):  # noqa: F811
    code, stdout, err = _prune(["--model", str(tiny_dir), "--tasks", "depth", "--budget", "memory=1TB",
                                "--out", str(tmp_path / "tb")], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["budget"] == {"kind": "memory", "value": 1.0}
    assert "nothing is pruned" in summary["memory_budget"]["note"]
    assert summary["params_ratio"] == 1.0 and summary["memory_ratio"] == 1.0


@pytest.mark.parametrize(("budget", "fragment"), [
    ("memory=0", "fraction in (0, 1]"),
    ("memory=-1MB", "positive number of bytes"),
    ("memory=abc", "neither a fraction"),
    ("memory=1.5", "fraction in (0, 1]"),
    ("memory=10kB", "unreachable"),  # below the smallest plan: refused with both sizes
    ("energy=0.5", "memory=3MB"),
])
def test_bad_memory_budget_is_one_line(tiny_dir, tmp_path, capsys, budget, fragment):  # noqa: F811
    code, _, err = _prune(["--model", str(tiny_dir), "--tasks", "depth", "--budget", budget,
                           "--out", str(tmp_path / "x")], capsys)
    assert code != 0 and len(err) == 1 and fragment in err[0], err


# ------------------------------------------------------------------------------ the federation


@pytest.mark.slow
def test_a_federation_device_with_a_memory_budget_gets_a_plan_within_it(tmp_path):
    from test_federation import scenario_file, tiny_model_dir

    from simulations.runner import run_scenario

    base = tiny_model_dir(tmp_path)
    devices = {0: {"tasks": ["seg", "depth"], "budget_kind": "memory", "budget": 0.6},
               1: {"tasks": ["depth"], "class": "small"}}
    summary = run_scenario(scenario_file(tmp_path, base, rounds=0, devices=devices), out_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    entries = {d["device_id"]: d for d in report["devices"]}
    assert summary["devices_ok"] == 2, [d["reason"] for d in report["devices"]]
    memory = entries["device-0000"]
    assert memory["budget_kind"] == "memory" and memory["budget"] == 0.6
    assert 0.5 <= memory["memory_ratio"] <= 0.6 + 1e-9 and memory["memory_bytes"] > 0
    assert entries["device-0001"]["params_ratio"] <= 0.5 + 1e-9
    assert report["summary"]["all_within_budget"]
