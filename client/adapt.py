"""On-device adaptation of a delivered model: a few local distillation steps, kept only if they help.

The device splits its own training samples in two: it adapts on one half (task losses on its labels plus
distillation from its dense base model) and compares delivered and adapted on the other half, by the
multi-task delta of their primary metrics. The adapted model becomes active only when that delta is
positive; otherwise the delivered model stays active. BatchNorm statistics stay as the server's recovery
left them (estimated on hundreds of samples) and the step size is small (default lr 3e-5): measured on the
default fleet's delivered models, lr 1e-3 left 19 of 20 devices no better on their validation half (and the one
it kept ended below its delivered model on held-out samples), and updating the statistics from the device's
batches hurt at every lr tried (BENCHMARKS.md, On-device adaptation). Nothing of it leaves the device: the server learns
only whether it was accepted and the metrics the evaluate phase reports.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import Subset

from client.data import LocalData
from cut.models import MultiTaskModel
from cut.train import evaluate, finetune, make_loader, multitask_delta
from protocol.phases import Adoption


def split_for_adaptation(data: LocalData) -> tuple[Subset, Subset]:
    """(adapt, validate): alternate samples of the device's training split (never its held-out eval split)."""
    indices = list(data.train.indices)
    return Subset(data.train.dataset, indices[0::2]), Subset(data.train.dataset, indices[1::2])


def adapt(model: MultiTaskModel, teacher: MultiTaskModel, data: LocalData, adoption: Adoption,
          seed: int) -> tuple[MultiTaskModel, dict[str, Any]]:
    """The model to keep (adapted or as delivered) and what happened: accepted, validation gain, samples."""
    fit, check = split_for_adaptation(data)
    tasks = list(model.task_names)
    if len(fit) < 2 or len(check) < 2:
        return model, {"accepted": False, "val_gain": None, "val_samples": len(check)}
    check_loader = make_loader(check, adoption.adapt_batch_size)
    before = evaluate(model, check_loader, tasks)
    candidate = copy.deepcopy(model)
    torch.manual_seed(seed)
    finetune(candidate, teacher, make_loader(fit, adoption.adapt_batch_size, shuffle=True, seed=seed),
             steps=adoption.adapt_steps, lr=adoption.adapt_lr, distill_weight=0.5, progress=False,
             freeze_bn_stats=True)
    candidate.eval()
    gain = multitask_delta(model, evaluate(candidate, check_loader, tasks), before)
    accepted = bool(gain == gain and gain > 0)  # NaN (a metric over no valid pixel) is not an improvement
    return (candidate if accepted else model), {"accepted": accepted, "val_gain": float(gain),
                                                "val_samples": len(check)}


__all__ = ["adapt", "split_for_adaptation"]
