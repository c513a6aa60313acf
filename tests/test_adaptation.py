"""On-device adaptation (client.adapt): kept only when it helps on the device's own validation half."""

from __future__ import annotations

import copy

import torch
from test_federation import tiny_model_dir

from client.adapt import adapt, split_for_adaptation
from client.data import local_data
from client.device import Device
from cut.checkpoint import load_model
from cut.messages import Budget
from protocol.phases import Adoption, DataSpec


def _device() -> Device:
    data = DataSpec(dataset="scenes", dataset_kwargs={"size": 32, "seed": 1}, samples_per_device=48, min_samples=8)
    return Device("d", 0, 2, ("seg", "depth"), Budget("params", 0.5), "", data)


def test_adaptation_splits_the_training_samples_and_never_touches_the_eval_split():
    data = local_data(_device())
    fit, check = split_for_adaptation(data)
    assert set(fit.indices).isdisjoint(check.indices)
    assert set(fit.indices) | set(check.indices) == set(data.train.indices)
    assert set(data.eval.indices).isdisjoint(data.train.indices)


def test_adaptation_is_kept_when_it_helps_and_refused_when_it_does_not(tmp_path):
    base, _ = load_model(tiny_model_dir(tmp_path))
    teacher = base.decompose(["seg", "depth"]).eval()
    data = local_data(_device())
    damaged = copy.deepcopy(teacher)
    with torch.no_grad():  # a delivered model far from the teacher: local distillation must help
        for p in damaged.heads.parameters():
            p.mul_(0.2)
    kept, outcome = adapt(damaged, teacher, data, Adoption(adapt_steps=20, adapt_lr=3e-3), seed=0)
    assert outcome["accepted"] and outcome["val_gain"] > 0 and kept is not damaged
    # A step size that wrecks the model: the validation half says no, the delivered model stays.
    kept, outcome = adapt(teacher, teacher, data, Adoption(adapt_steps=5, adapt_lr=5.0), seed=0)
    assert not outcome["accepted"] and not outcome["val_gain"] > 0 and kept is teacher  # a loss or NaN


def test_adaptation_leaves_batchnorm_statistics_as_delivered(tmp_path):
    """A device's few non-IID batches must not overwrite the statistics the server's recovery estimated."""
    base, _ = load_model(tiny_model_dir(tmp_path))
    teacher = base.decompose(["seg", "depth"]).eval()
    data = local_data(_device())

    def stats(model):
        return [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    before = stats(teacher)
    damaged = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in damaged.heads.parameters():
            p.mul_(0.2)
    kept, outcome = adapt(damaged, teacher, data, Adoption(adapt_steps=10, adapt_lr=3e-3), seed=0)
    assert outcome["accepted"] and kept is not damaged
    assert all(torch.equal(a, b) for a, b in zip(before, stats(kept), strict=True))
    # the same steps with statistics updated (what finetune does by default) do move them: the check can fail
    from cut.train import finetune, make_loader
    moved = copy.deepcopy(damaged)
    finetune(moved, teacher, make_loader(data.train, 16, shuffle=True), steps=10, lr=3e-3, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(before, stats(moved), strict=True))
