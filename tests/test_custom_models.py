"""Users' own models inside cut's engine (cut.models.custom): wrapping, decomposing, what is left whole, errors."""

from __future__ import annotations

import custom_models
import numpy as np
import pytest
import torch
from torch import nn

from cut.groups import analyse
from cut.importance import score_tasks
from cut.models.custom import DroppedHead, UnsupportedModel, make_tasks, unwrap, wrap

HEADS = {"seg": "seg_head", "cls": "cls_head"}


def _wrap(net, tasks=("seg", "cls"), heads=HEADS, shape=(3, 32, 32)):
    return wrap(net, make_tasks(list(tasks)), heads, shape)


def test_groups_are_named_after_the_users_modules_and_owned_by_their_heads():
    model = _wrap(custom_models.resnet18())
    groups = analyse(model).by_name()
    assert model.config.classifiers == ("seg_head.3", "cls_head.2")
    assert groups["net.seg_head.0"].tasks == ("seg",) and not groups["net.seg_head.0"].shared
    assert groups["net.trunk.0"].shared and groups["net.trunk.0"].tasks == ()  # inside the trunk
    (feeding,) = [g for g in groups.values() if "net.seg_head.0" in g.in_modules]
    assert feeding.shared and feeding.tasks == ("seg", "cls") and "net.cls_head.2" in feeding.in_modules
    assert not any(name.startswith("net.cls_head") for name in groups)  # its only Linear is the classifier


def test_decompose_keeps_the_class_and_stands_in_for_dropped_heads():
    model = _wrap(custom_models.mobilenet_v2())
    sub = model.decompose(["seg"])
    net = unwrap(sub)
    assert type(net) is type(unwrap(model)) and unwrap(model).cls_head is not net.cls_head
    assert isinstance(net.cls_head, DroppedHead) and not list(net.cls_head.parameters())
    assert set(net(torch.zeros(2, 3, 32, 32))) == {"seg"}
    assert [g for g in analyse(sub).names if "cls_head" in g] == []
    # The stand-in still works once the trunk that feeds it is narrower.
    from cut.budget import make_plan
    from cut.compact import compact_model

    analysis = analyse(sub)
    plan = make_plan({g: np.arange(s, dtype=np.float32) for g, s in analysis.sizes.items()}, analysis, "params", 0.5)
    small = unwrap(compact_model(sub, plan)).eval()
    assert small.trunk[18][0].out_channels < 1280
    assert set(small(torch.zeros(1, 3, 32, 32))) == {"seg"}


def test_token_linears_are_scored_per_feature_as_the_weight_gradient_form_says():
    """Linear layers on (N, tokens, C) activations hold channels last; fisher/taylor from activations must still
    equal sums of w * dL/dw over each group's parameters."""
    from cut.importance import ScoringContext, _channel_sums, _per_batch_grads, _times_weight, task_objective

    torch.manual_seed(0)
    model = _wrap(custom_models.hybrid()).eval()
    batches = custom_models.batches(n=2)
    analysis = analyse(model)
    fast = score_tasks(model, batches, ["seg", "cls"], "taylor", 2)
    ctx = ScoringContext(model, analysis, batches, {t: task_objective(model, t) for t in ("seg", "cls")},
                         {t: analysis.groups_of_task(t) for t in ("seg", "cls")})
    signed: dict = {"seg": {}, "cls": {}}
    for obj, grads in _per_batch_grads(model, batches, ctx.objectives, dict(model.named_parameters())):
        for g, v in _channel_sums(ctx, ctx.groups[obj], _times_weight(ctx, grads)).items():
            signed[obj][g] = signed[obj].get(g, 0) + v.astype(np.float64)
    assert "net.block.linear1" in fast["cls"]
    for t in ("seg", "cls"):
        for g, v in fast[t].items():
            scale = np.abs(signed[t][g]).max() + 1e-12
            np.testing.assert_allclose(v, np.abs(signed[t][g]), rtol=1e-3, atol=1e-4 * scale)


def test_grouped_convolutions_are_kept_whole_with_the_reason():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4),
                                       nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU())
            self.cls_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

        def forward(self, x):
            return {"cls": self.cls_head(self.trunk(x))}

    analysis = analyse(_wrap(Grouped(), ["cls"], {"cls": "cls_head"}))
    assert analysis.names == ["net.trunk.4"]
    assert analysis.kept_whole == {"net.trunk.0": "net.trunk.2: grouped convolution (groups=4)",
                                   "net.trunk.2": "net.trunk.2: grouped convolution (groups=4)"}


class _TensorOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.seg_head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.seg_head(x)


class _PoolHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 3)
        self.cls_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seg_head = nn.Conv2d(8, 2, 1)
        self.spare = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.trunk(x)
        return {"cls": self.cls_head(f), "seg": self.seg_head(f)}


@pytest.mark.parametrize("net, tasks, heads, message", [
    (_TensorOut(), ["seg"], {"seg": "seg_head"}, "must return a dict of task outputs, got Tensor"),
    (_PoolHead(), ["seg"], {"seg": "seg_head", "cls": "cls_head"}, "head of task 'cls' .* runs no Conv2d or Linear"),
    (_PoolHead(), ["seg"], {"seg": "head"}, "head 'head' of task 'seg' is not a submodule of _PoolHead"),
    (_PoolHead(), ["seg"], {"seg": "seg_head", "cls": "spare"}, r"heads \['spare'\] are never called"),
    (_PoolHead(), ["seg"], {"seg": "seg_head", "cls": "seg_head"}, "heads overlap"),
    (_PoolHead(), ["seg"], {"seg": "seg_head", "depth": "spare"}, r"returned no tensor for tasks \['depth'\]"),
    (_PoolHead(), ["seg"], {"cls": "spare"}, r"heads names no module for tasks \['seg'\]"),
])
def test_unsupported_models_fail_with_a_message_naming_the_module(net, tasks, heads, message):
    with pytest.raises(UnsupportedModel, match=message):
        _wrap(net, tasks, heads, (3, 8, 8))


def test_built_in_models_name_task_of_module_by_their_heads():
    from cut.models import ModelConfig, build_model
    from cut.tasks import TaskSpec

    model = build_model(ModelConfig(tasks=(TaskSpec("seg", "segmentation", num_classes=3),), input_size=(32, 32)))
    assert model.task_of_module("heads.seg.branches.0.0") == "seg"
    assert model.task_of_module("backbone.conv1") is None
    assert analyse(model).kept_whole == {}
