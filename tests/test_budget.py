"""Budget planning: never above the budget, within 1 point of it, min channels and rounding respected."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cut.budget import (
    BudgetOptions,
    allowed_counts,
    check_budget,
    cost_for,
    make_plan,
    min_keep,
    uniform_keep_fraction,
)
from cut.data.scenes import scene_tasks
from cut.groups import analyse
from cut.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def analysis():
    # The default architecture (resnet18 width 0.25, 64-channel heads) at a small input: costs only need shapes.
    return analyse(build_model(ModelConfig(tasks=scene_tasks(), input_size=(32, 32))).decompose(["seg", "normals"]))


def random_scores(analysis, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.name: rng.random(g.size).astype(np.float32) for g in analysis.groups}


@pytest.mark.parametrize("kind", ["params", "macs", "memory"])
@pytest.mark.parametrize("budget", [0.2, 0.3, 0.45, 0.6, 0.75, 0.9])
def test_reached_fraction_is_never_above_and_within_one_point(analysis, kind, budget):
    plan = make_plan(random_scores(analysis, int(budget * 100)), analysis, kind, budget)
    counts = {g: len(v) for g, v in plan.keep.items()}
    cost, _ = cost_for(analysis, kind, BudgetOptions())  # memory: cut.memory.MemoryCost (tests/test_memory_budget.py)
    reached = cost.cost(kind, cost.counts_vector(counts)) / cost.dense(kind)
    assert reached <= budget
    assert reached >= budget - 0.01
    assert math.isclose(plan.achieved[f"{kind}_ratio"], reached)
    options = BudgetOptions()
    for name, kept in counts.items():
        size = analysis.sizes[name]
        assert kept >= min_keep(size, options)
        assert kept % options.round_to == 0 or kept == size


def test_custom_minimum_and_rounding(analysis):
    options = BudgetOptions(min_channels=4, min_fraction=0.5, round_to=4)
    plan = make_plan(random_scores(analysis), analysis, "params", 0.3, options)
    for name, kept in plan.keep.items():
        size = analysis.sizes[name]
        assert len(kept) >= min(4, math.ceil(0.5 * size))
        assert len(kept) % 4 == 0 or len(kept) == size


def test_allowed_counts():
    opts = BudgetOptions()
    assert allowed_counts(16, opts).tolist() == [8, 16]  # min keep is min(8, 25% of 16) = 4 -> first multiple 8
    assert allowed_counts(12, opts).tolist() == [8, 12]
    assert allowed_counts(4, opts).tolist() == [4]  # too small to round: only the whole group
    assert allowed_counts(64, BudgetOptions(round_to=1, min_channels=8)).tolist() == list(range(8, 65))


def test_plan_keeps_the_best_scored_channels(analysis):
    scores = random_scores(analysis, 5)
    plan = make_plan(scores, analysis, "params", 0.5)
    for name, kept in plan.keep.items():
        order = np.argsort(-scores[name], kind="stable")
        assert set(kept) == set(order[: len(kept)].tolist())


def test_full_budget_keeps_everything_and_plan_metadata(analysis):
    plan = make_plan(random_scores(analysis), analysis, "params", 1.0, base_model_sha256="ab" * 32, method="snip")
    assert plan.pruned_groups() == {}
    assert plan.tasks == ("seg", "normals") and plan.method == "snip" and plan.budget_value == 1.0


@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), float("inf")])
def test_budgets_outside_the_unit_interval_are_rejected(analysis, value):
    with pytest.raises(ValueError, match="budget value"):
        make_plan(random_scores(analysis), analysis, "params", value)
    with pytest.raises(ValueError, match="budget value"):
        check_budget("macs", value)


def test_unknown_kind_and_unreachable_budget_are_rejected(analysis):
    with pytest.raises(ValueError, match="budget kind"):
        make_plan(random_scores(analysis), analysis, "energy", 0.5)
    with pytest.raises(ValueError, match="latency table"):  # latency needs the device's measured table
        make_plan(random_scores(analysis), analysis, "latency", 0.5)
    with pytest.raises(ValueError, match="unreachable"):
        make_plan(random_scores(analysis), analysis, "params", 0.001)
    with pytest.raises(ValueError, match="no fused scores"):
        make_plan({}, analysis, "params", 0.5)


def test_uniform_keep_fraction_meets_the_budget(analysis):
    r = uniform_keep_fraction(analysis, "params", 0.25)
    assert 0.4 < r < 0.6  # params shrink roughly with the square of the channel fraction
    cost = analysis.cost
    assert cost.cost("params", cost.group_sizes * r) <= 0.25 * cost.dense_params


def test_cost_aware_ranking_prunes_expensive_channels_first(analysis):
    from cut.budget import channel_costs

    costs = channel_costs(analysis.cost, "params")
    cheap, dear = analysis.names[int(costs.argmin())], analysis.names[int(costs.argmax())]
    flat = {g.name: np.ones(g.size, dtype=np.float32) for g in analysis.groups}  # no preference by score
    aware = make_plan(flat, analysis, "params", 0.5)
    assert len(aware.keep[cheap]) / analysis.sizes[cheap] > len(aware.keep[dear]) / analysis.sizes[dear]
    plain = make_plan(random_scores(analysis), analysis, "params", 0.5, BudgetOptions(cost_aware=False))
    assert plain.achieved["params_ratio"] <= 0.5


# ----------------------------------------------------------------------------------------------------
# cut.planner: the one function from per-task scores to a plan


def _tiny_scored():
    import torch

    from cut.data import get_dataset
    from cut.importance import score_tasks, take_batches
    from cut.train import make_loader

    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16))
    model = model.decompose(["seg", "normals"]).eval()
    batches = take_batches(make_loader(get_dataset("scenes", "train", num_samples=8, size=32, seed=0), 4), 2)
    return model, score_tasks(model, batches, ["seg", "normals"], "fisher", 2)


@pytest.mark.parametrize("normalise", ["global", "mean"])
@pytest.mark.parametrize("priorities", [{}, {"seg": 3.0, "normals": 0.5}])
def test_plan_from_scores_is_the_servers_plan_bit_for_bit(normalise, priorities):
    from cut import fusion
    from cut.planner import plan_from_scores

    model, per_task = _tiny_scored()
    analysis = analyse(model)
    options = BudgetOptions(round_to=2, min_channels=2)
    tasks = ("seg", "normals")
    # what server/planning.py:PlanBook.plan did before it called plan_from_scores (the frozen reference)
    fused = fusion.fuse(per_task, rule="weighted", normalisation=normalise, priorities=priorities)
    server = make_plan(fused, analysis, "params", 0.4, options, base_model_sha256="cd" * 32, tasks=tasks,
                       method="cut")
    ours = plan_from_scores(per_task, analysis, "params", 0.4, options=options, priorities=priorities,
                            normalise=normalise, rule="weighted", base_model_sha256="cd" * 32, tasks=tasks,
                            method="cut")
    assert ours.to_json() == server.to_json() and ours.plan_hash == server.plan_hash
    if not priorities and normalise == "global":  # the defaults are the server's arguments
        assert plan_from_scores(per_task, analysis, "params", 0.4, options=options, base_model_sha256="cd" * 32,
                                tasks=tasks).to_json() == server.to_json()


def test_plan_with_cut_plans_through_plan_from_scores():
    from cut.data import get_dataset
    from cut.importance import score_tasks, take_batches
    from cut.methods import PlanRequest, plan_with
    from cut.planner import plan_from_scores
    from cut.train import make_loader

    model, _ = _tiny_scored()
    batches = take_batches(make_loader(get_dataset("scenes", "train", num_samples=8, size=32, seed=0), 4), 2)
    options = BudgetOptions(round_to=2, min_channels=2)
    via_method = plan_with("cut", PlanRequest(model, batches, ("seg", "normals"), "params", 0.5, options)).plan
    per_task = score_tasks(model, batches, ["seg", "normals"], "fisher", 2)
    direct = plan_from_scores(per_task, analyse(model), "params", 0.5, options=options, tasks=("seg", "normals"))
    assert via_method.keep == direct.keep


def test_uniform_plan_keeps_one_fraction_everywhere(analysis):
    from cut.planner import uniform_counts, uniform_plan

    scores = random_scores(analysis, 7)
    r, counts = uniform_counts(analysis, "params", 0.5)
    plan = uniform_plan(scores, analysis, "params", 0.5, method="l1")
    assert plan.achieved["params_ratio"] <= 0.5

    def floor(size: int, fraction: float) -> int:
        allowed = allowed_counts(size, BudgetOptions())
        below = allowed[allowed <= fraction * size + 1e-9]
        return int(below.max() if len(below) else allowed[0])

    def step_up(size: int, count: int) -> int:
        allowed = allowed_counts(size, BudgetOptions())
        return int(allowed[allowed > count].min()) if (allowed > count).any() else count

    for name, kept in plan.keep.items():  # within one allowed step of r x size
        size = analysis.sizes[name]
        assert len(kept) == counts[name] in {floor(size, r), step_up(size, floor(size, r))}
        assert set(kept) == set(np.argsort(-scores[name], kind="stable")[: len(kept)].tolist())
    assert plan.achieved["params_ratio"] >= 0.47  # rounding up by largest remainder gets close to the budget
    # a slightly larger fraction, rounded down everywhere, would break the budget (r is the largest that fits)
    bigger = {g: floor(s, r + 0.02) for g, s in analysis.sizes.items()}
    assert analysis.cost.cost("params", analysis.cost.counts_vector(bigger)) > 0.5 * analysis.cost.dense_params


def test_union_plan_meets_the_budget_and_keeps_every_tasks_top(analysis):
    from cut.fusion import top_fraction
    from cut.planner import union_plan

    per_task = {"seg": random_scores(analysis, 1), "normals": random_scores(analysis, 2)}
    plan, q = union_plan(per_task, analysis, "params", 0.5)
    assert plan.achieved["params_ratio"] <= 0.5 and 0 < q < 1
    for scores in per_task.values():
        for g, mask in top_fraction(scores, q).items():
            assert set(np.flatnonzero(mask)) <= set(plan.keep[g])
