"""Compared methods, the pruning pipeline and the benchmark runner, on a tiny model and a few scenes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch_pruning as tp

from cut.bench import run_bench
from cut.budget import BudgetOptions
from cut.compact import compact_model
from cut.data import get_dataset
from cut.data.scenes import scene_tasks
from cut.groups import example_input
from cut.importance import summed_objective, take_batches
from cut.methods import METHODS, PlanRequest, TorchPruningTaylor, masks_with, plan_with
from cut.models import ModelConfig, build_model, count_params
from cut.pipeline import prune
from cut.train import make_loader

TASKS = ("seg", "normals")
OPTIONS = BudgetOptions(round_to=2, min_channels=2)


@pytest.fixture(scope="module")
def data():
    train = get_dataset("scenes", "train", num_samples=8, size=32, seed=0)
    test = get_dataset("scenes", "test", num_samples=4, size=32, seed=0)
    return train, test


def tiny_base():
    torch.manual_seed(0)
    cfg = ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16)
    return build_model(cfg).eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_meets_the_budget_on_the_decomposed_model(method, data):
    model = tiny_base().decompose(list(TASKS))
    batches = take_batches(make_loader(data[0], 4), 2)
    result = plan_with(method, PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS, seed=1))
    compact = compact_model(model, result.plan)
    ratio = count_params(compact) / count_params(model)
    assert ratio <= 0.5 and ratio == pytest.approx(result.plan.achieved["params_ratio"])
    assert result.plan.tasks == TASKS and result.plan.method == method
    assert set(result.seconds) >= {"scoring", "fusion", "planning"}


def test_taylor_tp_plan_matches_torch_prunings_own_pruning(data):
    model = tiny_base().decompose(list(TASKS))
    batches = take_batches(make_loader(data[0], 4), 2)
    result = TorchPruningTaylor(PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS)).run()
    assert all(p.grad is None for p in model.parameters())  # gradients it needed are cleaned up
    # Prune a copy with torch-pruning itself at the found ratio: same architecture and weights.
    ref = copy.deepcopy(model)
    objective = summed_objective(ref, list(TASKS))
    for images, targets in batches:
        objective(ref(images), targets).backward()
    pruner = tp.pruner.MetaPruner(ref, example_input(ref), importance=tp.importance.GroupTaylorImportance(),
                                  global_pruning=True, pruning_ratio=result.info["pruning_ratio"],
                                  ignored_layers=ref.classifier_layers(), round_to=OPTIONS.round_to)
    pruner.step()
    ours = compact_model(model, result.plan).state_dict()
    theirs = ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("budget", [0.9, 0.97])
def test_taylor_tp_handles_budgets_that_remove_almost_nothing(budget, data):
    # At small channel ratios torch-pruning yields groups with no channel to remove; they must be skipped.
    model = tiny_base().decompose(list(TASKS))
    batches = take_batches(make_loader(data[0], 4), 2)
    result = TorchPruningTaylor(PlanRequest(model, batches, TASKS, "params", budget, OPTIONS)).run()
    assert result.plan.achieved["params_ratio"] <= budget


@pytest.mark.parametrize("method", ["random", "magnitude", "snip", "disparse", "cut"])
def test_unstructured_methods_reach_the_sparsity(method, data):
    model = tiny_base().decompose(list(TASKS))
    batches = take_batches(make_loader(data[0], 4), 1)
    masks = masks_with(method, model, batches, list(TASKS), 0.8)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)


def test_pipeline_report(data):
    train, test = data
    base = tiny_base()
    compact, plan, report = prune(base, list(TASKS), "params", 0.5, "cut", None, None, make_loader(train, 4),
                                  make_loader(test, 4), num_batches=2, finetune_steps=1, seed=0,
                                  base_sha256="ab" * 32, options=OPTIONS, progress=False)
    assert plan.base_model_sha256 == "ab" * 32 and report["plan_hash"] == plan.plan_hash
    assert report["params"] == count_params(compact) and report["params_ratio"] <= 0.5
    assert report["params_ratio_full"] < report["params_ratio"]
    assert report["decomposition"]["params_ratio"] < 1
    assert set(report["metrics"]) == {"dense", "compact", "compact_before_finetune"}
    assert set(report["metrics"]["compact"]) == set(TASKS)
    assert isinstance(report["delta_m"], float) and isinstance(report["delta_m_before_finetune"], float)
    assert report["bn_recalibrated"] and report["seconds"]["bn_recalibration"] >= 0
    for key in ("scoring", "fusion", "planning", "compaction", "prune_total", "finetune"):
        assert report["seconds"][key] >= 0
    json.dumps(report)  # serialisable as is


def test_pipeline_rejects_bad_budgets(data):
    with pytest.raises(ValueError, match="budget value"):
        prune(tiny_base(), list(TASKS), "params", 1.5, train_loader=make_loader(data[0], 4), progress=False)


@pytest.mark.parametrize("structured", [True, False])
def test_bench_writes_results_table_and_plot(structured, data, tmp_path):
    results = run_bench(tiny_base(), data, list(TASKS), [0.5], ["random", "cut"], [0, 1], 0, tmp_path,
                        structured=structured, sparsity=0.7, batch_size=4, num_batches=1, options=OPTIONS,
                        progress=False)
    assert len(results["rows"]) == 4
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert {"method", "budget", "seed", "delta_m", "params_ratio", "macs_ratio", "metrics"} <= set(on_disk["rows"][0])
    md = (tmp_path / "results.md").read_text()
    assert "| cut |" in md and "±" in md
    assert (tmp_path / "delta_m_vs_budget.png").stat().st_size > 1000
