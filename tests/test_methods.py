"""Compared methods and the pruning pipeline, on a tiny model and a few scenes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch_pruning as tp

from cut.baselines import TP_CHOICE, TP_GRID, TorchPruningPeer, TPConfig, early_layers, filter_l1, uniform_options
from cut.budget import BudgetOptions, allowed_counts
from cut.compact import compact_model
from cut.data import get_dataset
from cut.data.scenes import scene_tasks
from cut.groups import analyse, example_input
from cut.importance import score_tasks, take_batches
from cut.methods import BASELINES, METHODS, PlanRequest, canonical, get_method, masks_with, plan_with
from cut.models import ModelConfig, build_model, count_params
from cut.pipeline import RecoveryConfig, prune
from cut.planner import uniform_counts
from cut.train import make_loader

TASKS = ("seg", "normals")
OPTIONS = BudgetOptions(round_to=2, min_channels=2)


@pytest.fixture(scope="module")
def data():
    train = get_dataset("scenes", "train", num_samples=8, size=32, seed=0)
    test = get_dataset("scenes", "test", num_samples=4, size=32, seed=0)
    return train, test


@pytest.fixture(scope="module")
def batches(data):
    return take_batches(make_loader(data[0], 4), 2)


def tiny_base():
    torch.manual_seed(0)
    cfg = ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16)
    return build_model(cfg).eval()


def tiny_model():
    return tiny_base().decompose(list(TASKS))


NON_GRID = [m for m, spec in METHODS.items() if spec.kind != "tp-grid"]


@pytest.mark.parametrize("method", [*NON_GRID, "tp-taylor-max1-all-oneshot", "tp-l2-max0.75-early-it100"])
def test_every_method_meets_the_budget_on_the_decomposed_model(method, batches):
    model = tiny_model()
    result = plan_with(method, PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS, seed=1))
    compact = compact_model(model, result.plan)
    ratio = count_params(compact) / count_params(model)
    assert ratio <= 0.5 and ratio == pytest.approx(result.plan.achieved["params_ratio"])
    assert ratio > 0.4  # near the budget, not far below it
    assert result.plan.tasks == TASKS and result.plan.method == method
    assert set(result.seconds) >= {"scoring", "fusion", "planning"}


def test_registry_kinds_and_aliases():
    assert BASELINES == ("random", "l1", "snip", "disparse", "tp")
    assert canonical("magnitude") == "l1" and canonical("torch-pruning") == "tp"
    assert get_method("cut").kind == "cut"
    assert all(METHODS[m].kind == "ablation" for m in METHODS if m.startswith("cut-"))
    assert len(TP_GRID) == 16 and len({c.name for c in TP_GRID}) == 16 and TP_CHOICE in TP_GRID
    with pytest.raises(ValueError, match="unknown pruning method"):
        canonical("lottery")


def test_published_baselines_cannot_be_reconfigured(batches):
    request = PlanRequest(tiny_model(), batches, TASKS, "params", 0.5, OPTIONS)
    with pytest.raises(ValueError, match="published recipe"):
        plan_with("snip", request, criterion="fisher")


@pytest.mark.parametrize("method", ["random", "l1"])
def test_uniform_baselines_keep_the_same_fraction_of_every_group(method, batches):
    model = tiny_model()
    analysis = analyse(model)
    result = plan_with(method, PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS, seed=3))
    options = uniform_options(OPTIONS)  # exact ratios: any count >= min_keep
    r, counts = uniform_counts(analysis, "params", 0.5, options)
    assert result.info["keep_fraction"] == r and result.plan.achieved["params_ratio"] > 0.49
    for g, size in analysis.sizes.items():
        allowed = allowed_counts(size, options)
        below = allowed[allowed <= r * size + 1e-9]
        floor = below.max() if len(below) else allowed[0]
        above = allowed[allowed > floor]
        assert len(result.plan.keep[g]) == counts[g] in {floor, above.min() if len(above) else floor}
    if method == "l1":  # within each group, the filters with the largest L1 norm
        norms = filter_l1(model, analysis)
        for g, kept in result.plan.keep.items():
            dropped = sorted(set(range(analysis.sizes[g])) - set(kept))
            if dropped:
                assert norms[g][list(kept)].min() >= norms[g][dropped].max()


def test_random_baseline_depends_on_the_seed_only(batches):
    model = tiny_model()
    plans = [plan_with("random", PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS, seed=s)).plan.keep
             for s in (1, 1, 2)]
    assert plans[0] == plans[1] and plans[0] != plans[2]


def test_disparse_keeps_each_tasks_top_fraction(batches):
    model = tiny_model()
    result = plan_with("disparse", PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS))
    q = result.info["keep_fraction"]
    per_task = score_tasks(model, batches, list(TASKS), "saliency", len(batches))
    from cut.fusion import top_fraction

    for task, scores in per_task.items():
        kept = top_fraction(scores, q)
        for g, mask in kept.items():
            assert set(np.flatnonzero(mask)) <= set(result.plan.keep[g]), (task, g)


def _tp_reference(model, batches, config: TPConfig, ratio: float):
    ref = copy.deepcopy(model)
    ignored = ref.classifier_layers() + (early_layers(ref) if config.ignore_early else [])
    imp = tp.importance.GroupMagnitudeImportance(p=2) if config.importance == "magnitude" else \
        tp.importance.GroupTaylorImportance()
    if config.importance == "taylor":
        from cut.importance import summed_objective

        objective = summed_objective(ref, list(TASKS))
        for images, targets in batches:
            objective(ref(images), targets).backward()
    pruner = tp.pruner.MetaPruner(ref, example_input(ref), importance=imp, global_pruning=True, pruning_ratio=ratio,
                                  max_pruning_ratio=config.max_pruning_ratio, ignored_layers=ignored,
                                  round_to=OPTIONS.round_to)
    pruner.step()
    return ref


@pytest.mark.parametrize("config", [TP_CHOICE, TPConfig("taylor", 1.0, False, 1)])
def test_tp_one_shot_plan_matches_torch_prunings_own_pruning(config, batches):
    model = tiny_model()
    result = TorchPruningPeer(PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS), config).run()
    assert all(p.grad is None for p in model.parameters())  # gradients it needed are cleaned up
    ref = _tp_reference(model, batches, config, result.info["pruning_ratio"])
    ours, theirs = compact_model(model, result.plan).state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_tp_ignores_the_early_layers(batches):
    model = tiny_model()
    result = TorchPruningPeer(PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS), TP_CHOICE).run()
    early = [g for g in result.plan.keep if g.startswith(("backbone.conv1", "backbone.layer1"))]
    assert early and all(len(result.plan.keep[g]) == result.plan.group_sizes[g] for g in early)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_tp_iterative_plan_rebuilds_its_pruned_model(importance, batches):
    model = tiny_model()
    peer = TorchPruningPeer(PlanRequest(model, batches, TASKS, "params", 0.5, OPTIONS),
                            TPConfig(importance, 0.75, True, 20))
    result = peer.run()
    assert result.plan.achieved["params_ratio"] <= 0.5
    ours, theirs = compact_model(model, result.plan).state_dict(), peer.pruned.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("budget", [0.9, 0.97])
def test_tp_handles_budgets_that_remove_almost_nothing(budget, batches):
    # At small channel ratios torch-pruning yields groups with no channel to remove; they must be skipped.
    model = tiny_model()
    result = TorchPruningPeer(PlanRequest(model, batches, TASKS, "params", budget, OPTIONS)).run()
    assert result.plan.achieved["params_ratio"] <= budget


@pytest.mark.parametrize("method", ["random", "l1", "magnitude", "snip", "disparse", "cut"])
def test_unstructured_methods_reach_the_sparsity(method, data):
    model = tiny_model()
    masks = masks_with(method, model, take_batches(make_loader(data[0], 4), 1), list(TASKS), 0.8)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)


def test_unstructured_rejects_structured_only_methods(batches):
    with pytest.raises(ValueError, match="structured only"):
        masks_with("tp", tiny_model(), batches, list(TASKS), 0.8)


def test_pipeline_report(data):
    train, test = data
    base = tiny_base()
    compact, plan, report = prune(base, list(TASKS), "params", 0.5, "cut", None, None, make_loader(train, 4),
                                  make_loader(test, 4), num_batches=2, seed=0, base_sha256="ab" * 32,
                                  options=OPTIONS, recovery=RecoveryConfig(steps=1, batch_size=4), progress=False)
    assert plan.base_model_sha256 == "ab" * 32 and report["plan_hash"] == plan.plan_hash
    assert report["params"] == count_params(compact) and report["params_ratio"] <= 0.5
    assert report["params_ratio_full"] < report["params_ratio"]
    assert report["decomposition"]["params_ratio"] < 1
    assert set(report["metrics"]) == {"dense", "compact", "compact_before_recovery"}
    assert set(report["metrics"]["compact"]) == set(TASKS)
    assert isinstance(report["delta_m"], float) and isinstance(report["delta_m_before_recovery"], float)
    assert report["delta_m"] != report["delta_m_before_recovery"]  # recovery changed the weights
    assert report["recovery"]["steps"] == 1 and report["recovery"]["budget"].startswith("1 steps x 4")
    assert report["bn_recalibrated"] and report["seconds"]["bn_recalibration"] >= 0
    for key in ("scoring", "fusion", "planning", "compaction", "prune_total", "recovery"):
        assert report["seconds"][key] >= 0
    json.dumps(report)  # serialisable as is


def test_pipeline_finetune_steps_is_the_recovery_alias(data):
    train, test = data
    _, _, report = prune(tiny_base(), list(TASKS), "params", 0.5, "l1", train_loader=make_loader(train, 4),
                         test_loader=make_loader(test, 4), num_batches=1, finetune_steps=2, options=OPTIONS,
                         progress=False)
    assert report["recovery"]["steps"] == 2 and "compact_before_recovery" in report["metrics"]


def test_pipeline_rejects_bad_budgets(data):
    with pytest.raises(ValueError, match="budget value"):
        prune(tiny_base(), list(TASKS), "params", 1.5, train_loader=make_loader(data[0], 4), progress=False)
