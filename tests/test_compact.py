"""Compaction: plans reproduce, round-trip and rebuild; every backbone prunes and trains; unstructured masks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cut.budget import BudgetOptions, make_plan
from cut.compact import (
    PlanMismatch,
    apply_masks,
    apply_plan,
    compact_model,
    recalibrate_batchnorm,
    unstructured_masks,
    weight_sparsity,
)
from cut.data.scenes import scene_tasks
from cut.groups import analyse
from cut.importance import prunable_weight_names
from cut.models import ModelConfig, build_model
from cut.plan import PruningPlan
from cut.tasks import TaskSpec

SHA = "ab" * 32


def tiny_model(backbone: str = "resnet18", seed: int = 0, tasks=("seg", "depth", "kind")):
    torch.manual_seed(seed)
    cfg = ModelConfig(tasks=scene_tasks() + (TaskSpec("kind", "classification", num_classes=4),), backbone=backbone,
                      width=0.125 if backbone != "mobilenet_v2" else 0.25, input_size=(32, 32), head_hidden=16,
                      cls_hidden=16)
    model = build_model(cfg).decompose(list(tasks))
    with torch.no_grad():  # non-trivial BN statistics so equality checks mean something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def half_plan(model, budget: float = 0.5, seed: int = 0) -> PruningPlan:
    a = analyse(model)
    rng = np.random.default_rng(seed)
    scores = {g.name: rng.random(g.size) for g in a.groups}
    return make_plan(scores, a, "params", budget, BudgetOptions(round_to=2, min_channels=2), SHA)


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_keep_all_plan_reproduces_dense_outputs():
    model = tiny_model()
    a = analyse(model)
    plan = PruningPlan(SHA, tuple(model.task_names), {g: tuple(range(n)) for g, n in a.sizes.items()}, a.sizes)
    compact = compact_model(model, plan)
    x = torch.randn(2, 3, 32, 32)
    dense, small = outputs(model, x), outputs(compact, x)
    for t in dense:
        assert (dense[t] - small[t]).abs().max() <= 1e-5


def test_pruning_keeps_the_kept_channels_weights():
    model = tiny_model()
    plan = half_plan(model)
    compact = compact_model(model, plan)
    kept = torch.tensor(plan.keep["backbone.layer3.0.conv1"])
    conv, small = model.backbone.layer3[0].conv1, compact.backbone.layer3[0].conv1
    assert torch.equal(small.weight, conv.weight[kept][:, torch.tensor(plan.keep["backbone.layer2.0.conv2"])])


def test_same_plan_twice_gives_identical_weights():
    model = tiny_model()
    plan = half_plan(model)
    a, b = compact_model(model, plan), compact_model(model, plan)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plan_json_round_trip_rebuilds_the_compact_model():
    model = tiny_model()
    plan = half_plan(model)
    compact = compact_model(model, plan)
    again = PruningPlan.from_json(plan.to_json())
    assert again.plan_hash == plan.plan_hash
    fresh = apply_plan(build_model(model.config), again)  # what a device does: config + plan + weights
    fresh.load_state_dict(compact.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    ya, yb = outputs(compact, x), outputs(fresh, x)
    for t in ya:
        assert torch.equal(ya[t], yb[t])


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "mobilenet_v2"])
def test_pruned_models_of_every_backbone_run_forward_and_backward(backbone):
    model = tiny_model(backbone)
    compact = compact_model(model, half_plan(model, 0.4))
    compact.train()
    out = compact(torch.randn(2, 3, 32, 32))
    assert out["seg"].shape == (2, 8, 32, 32) and out["kind"].shape == (2, 4)
    sum(o.float().pow(2).mean() for o in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in compact.parameters())


def test_mismatched_plans_are_refused():
    model = tiny_model()
    plan = half_plan(model)
    with pytest.raises(PlanMismatch, match="tasks"):
        apply_plan(tiny_model(tasks=("seg", "depth")), plan)
    compact = compact_model(model, plan)
    with pytest.raises(PlanMismatch, match="applied twice"):
        apply_plan(compact, plan)
    sizes = dict(plan.group_sizes)
    keep = dict(plan.keep)
    sizes["backbone.nothing"], keep["backbone.nothing"] = 4, (0,)
    with pytest.raises(PlanMismatch, match="unknown to the model"):
        apply_plan(copy.deepcopy(model), PruningPlan(SHA, plan.tasks, keep, sizes))


@pytest.mark.parametrize("rule", ["magnitude", "random", "scores"])
def test_unstructured_masks_reach_the_target_sparsity(rule):
    model = tiny_model()
    names = prunable_weight_names(model)
    assert "heads.seg.branches.0.3.weight" in names and not any("bn" in n for n in names)
    params = dict(model.named_parameters())
    scores = {n: torch.rand(params[n].shape) for n in names} if rule == "scores" else rule
    masks = unstructured_masks(model, scores, 0.9, seed=0)
    total = sum(m.numel() for m in masks.values())
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == round(0.9 * total)
    handles = apply_masks(model, masks)
    assert abs(weight_sparsity(model) - 0.9) < 1e-3
    # masked weights stay zero through a training step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    sum(o.float().pow(2).mean() for o in model(torch.randn(2, 3, 32, 32)).values()).backward()
    opt.step()
    for n in names:
        assert torch.all(params[n][~masks[n]] == 0)
    for h in handles:
        h.remove()


def test_magnitude_masks_remove_the_smallest_weights():
    model = tiny_model()
    masks = unstructured_masks(model, "magnitude", 0.5)
    params = dict(model.named_parameters())
    kept = torch.cat([params[n].detach().abs()[m] for n, m in masks.items()])
    dropped = torch.cat([params[n].detach().abs()[~m] for n, m in masks.items()])
    assert kept.min() >= dropped.max()
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_masks(model, "magnitude", 1.0)


def test_batchnorm_recalibration_changes_statistics_only():
    model = tiny_model()
    compact = compact_model(model, half_plan(model))
    before = {k: v.clone() for k, v in compact.state_dict().items()}
    batches = [(torch.randn(4, 3, 32, 32) * 2 + 1, {}) for _ in range(2)]
    recalibrate_batchnorm(compact, batches)
    assert not compact.training
    after = compact.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    bn = compact.backbone.bn1
    assert bn.momentum == 0.1  # restored
    x = torch.cat([b[0] for b in batches])
    stem = compact.backbone.conv1(x)
    assert torch.allclose(bn.running_mean, stem.mean((0, 2, 3)), atol=1e-4)
