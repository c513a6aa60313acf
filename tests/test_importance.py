"""Importance criteria: a planted useless channel ranks last; scores are finite, non-negative, well-shaped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cut.data import get_dataset
from cut.data.scenes import scene_tasks
from cut.groups import analyse
from cut.importance import CRITERIA, score_summed, score_tasks, take_batches, validate_scores
from cut.models import ModelConfig, build_model
from cut.train import make_loader

TASKS = ["seg", "depth", "normals"]
PLANTED_GROUP, PLANTED = "backbone.layer3.0.conv1", 5
HEAD_GROUP, HEAD_PLANTED = "heads.depth.branches.1.0", 3


@pytest.fixture(scope="module")
def batches():
    ds = get_dataset("scenes", "train", num_samples=8, size=32, seed=0)
    return take_batches(make_loader(ds, 4), 2)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16)
    model = build_model(cfg)
    _train_a_little(model)
    return model


def _train_a_little(model) -> None:
    """Non-default BN statistics and biases, so no score is zero by accident of initialisation."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.0, 0.2)


def plant_useless_channels(model) -> None:
    """Zero every parameter slice of one backbone channel and one depth-head channel."""
    with torch.no_grad():
        block = model.backbone.layer3[0]
        block.conv1.weight[PLANTED] = 0
        block.bn1.weight[PLANTED] = 0
        block.bn1.bias[PLANTED] = 0
        block.conv2.weight[:, PLANTED] = 0
        branch = model.heads["depth"].branches[1]
        branch[0].weight[HEAD_PLANTED] = 0
        branch[1].weight[HEAD_PLANTED] = 0
        branch[1].bias[HEAD_PLANTED] = 0
        branch[3].weight[:, HEAD_PLANTED] = 0


@pytest.mark.parametrize("criterion", ["taylor", "saliency", "fisher", "act-grad", "magnitude"])
def test_planted_useless_channel_ranks_last(criterion, batches):
    model = tiny_model()
    plant_useless_channels(model)
    scores = score_tasks(model, batches, TASKS, criterion, num_batches=2)
    for task in TASKS:
        vec = scores[task][PLANTED_GROUP]
        assert vec[PLANTED] == 0.0 and vec[PLANTED] == vec.min()
        assert (vec > 0).sum() >= len(vec) - 2  # the planted channel is last, not one of many zeros
    vec = scores["depth"][HEAD_GROUP]
    assert vec[HEAD_PLANTED] == vec.min() == 0.0 and (vec > 0).sum() >= len(vec) - 2


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_scores_are_finite_non_negative_and_cover_the_tasks_groups(criterion, batches):
    model = tiny_model(1)
    analysis = analyse(model)
    scores = score_tasks(model, batches, ["seg", "normals"], criterion, num_batches=2, seed=3)
    assert set(scores) == {"seg", "normals"}
    for task, per_group in scores.items():
        expected = {g.name for g in analysis.groups if g.shared or task in g.tasks}
        assert set(per_group) == expected
        validate_scores(per_group, analysis.sizes)
        for vec in per_group.values():
            assert vec.dtype == np.float32
    summed = score_summed(model, batches, ["seg", "normals"], criterion, num_batches=2, seed=3)
    assert set(summed) == {g.name for g in analysis.groups if g.shared or {"seg", "normals"} & set(g.tasks)}
    validate_scores(summed, analysis.sizes)


def test_taylor_equals_a_direct_computation(batches):
    model = tiny_model(2).eval()
    scores = score_tasks(model, batches, ["seg"], "taylor", num_batches=2)["seg"][PLANTED_GROUP]
    model.zero_grad()
    for images, targets in batches:
        model.config.task("seg").loss(model(images)["seg"], targets["seg"]).backward()
    block = model.backbone.layer3[0]
    expect = (block.conv1.weight * block.conv1.weight.grad).sum((1, 2, 3))
    expect = expect + block.bn1.weight * block.bn1.weight.grad + block.bn1.bias * block.bn1.bias.grad
    expect = expect + (block.conv2.weight * block.conv2.weight.grad).sum((0, 2, 3))
    np.testing.assert_allclose(scores, expect.abs().detach().numpy(), rtol=1e-4, atol=1e-9)


def test_random_scores_are_seeded_floats_in_unit_interval():
    model = tiny_model()
    a = score_tasks(model, None, ["seg"], "random", seed=1)["seg"]
    b = score_tasks(model, None, ["seg"], "random", seed=1)["seg"]
    c = score_tasks(model, None, ["seg"], "random", seed=2)["seg"]
    for g, vec in a.items():
        assert np.all((vec >= 0) & (vec < 1)) and not np.all(vec == np.round(vec))
        np.testing.assert_array_equal(vec, b[g])
        assert not np.array_equal(vec, c[g])


def test_bad_inputs_are_rejected(batches):
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown importance criterion"):
        score_tasks(model, batches, ["seg"], "psychic")
    with pytest.raises(ValueError, match="cannot score tasks"):
        score_tasks(model, batches, ["colour"], "taylor")
    with pytest.raises(ValueError, match="needs data"):
        score_tasks(model, None, ["seg"], "taylor")
    sizes = analyse(model).sizes
    name = next(iter(sizes))
    with pytest.raises(ValueError, match="non-finite"):
        validate_scores({name: np.full(sizes[name], np.nan)}, sizes)
    with pytest.raises(ValueError, match="negative"):
        validate_scores({name: -np.ones(sizes[name])}, sizes)
    with pytest.raises(ValueError, match="expected"):
        validate_scores({name: np.ones(sizes[name] + 1)}, sizes)


def test_scoring_leaves_the_model_untouched(batches):
    model = tiny_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score_tasks(model, batches, TASKS, "taylor", num_batches=2)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats included
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_activation_form_of_taylor_and_fisher_equals_the_weight_gradient_form(backbone, batches):
    """taylor/fisher come from activations * their gradients; they must equal sums of w * dL/dw."""
    from cut.importance import ScoringContext, _channel_sums, _per_batch_grads, _times_weight, task_objective
    from cut.tasks import TaskSpec

    torch.manual_seed(3)
    cfg = ModelConfig(tasks=scene_tasks() + (TaskSpec("kind", "classification", num_classes=4),), backbone=backbone,
                      width=0.25, input_size=(32, 32), head_hidden=16, cls_hidden=16)
    model = build_model(cfg).eval()
    _train_a_little(model)
    kind_batches = [(x, {**y, "kind": torch.arange(len(x)) % 4}) for x, y in batches]
    tasks = ["normals", "kind"]
    fast = score_tasks(model, kind_batches, tasks, "taylor", 2)
    fisher_fast = score_tasks(model, kind_batches, tasks, "fisher", 2)
    analysis = analyse(model)
    ctx = ScoringContext(model, analysis, kind_batches, {t: task_objective(model, t) for t in tasks},
                         {t: analysis.groups_of_task(t) for t in tasks})
    params = dict(model.named_parameters())
    signed: dict = {t: {} for t in tasks}
    squared: dict = {t: {} for t in tasks}
    for obj, grads in _per_batch_grads(model, kind_batches, ctx.objectives, params):
        for g, v in _channel_sums(ctx, ctx.groups[obj], _times_weight(ctx, grads)).items():
            signed[obj][g] = signed[obj].get(g, 0) + v.astype(np.float64)
            squared[obj][g] = squared[obj].get(g, 0) + v.astype(np.float64) ** 2
    for t in tasks:
        assert set(fast[t]) == set(signed[t])
        for g in fast[t]:
            scale = np.abs(signed[t][g]).max() + 1e-12
            np.testing.assert_allclose(fast[t][g], np.abs(signed[t][g]), rtol=1e-3, atol=1e-4 * scale)
            np.testing.assert_allclose(fisher_fast[t][g], squared[t][g], rtol=1e-3, atol=1e-4 * scale**2)
