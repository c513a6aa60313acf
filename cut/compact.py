"""Applying a PruningPlan to a model: a physically smaller dense model (CUT step 4), plus unstructured masks.

Structured: each group that loses channels is removed with torch-pruning's
`DependencyGraph.get_pruning_group(root, prune_out_channels, idxs).prune()`, so every coupled layer (BN,
consumers' input slices, residual partners) shrinks together. The plan must describe exactly this
model's groups (names and sizes), so a plan made for another architecture or task subset is refused with
the groups that differ. `apply_plan` works on a freshly built model of the plan's task subset: that is
how a device (or `cut.checkpoint.load_model`) rebuilds a compact model from config + plan + weights.

Unstructured (the DiSparse-style comparison at e.g. 90% sparsity): boolean masks over the weights of
every Conv2d and Linear, the heads' final classifiers included, with BatchNorm parameters and biases
excluded, as DiSparse counts sparsity. Masks come from a global ranking of per-weight scores.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from cut.groups import analyse, build_graph, pruning_group
from cut.importance import prunable_weight_names
from cut.models import MultiTaskModel
from cut.plan import PruningPlan


class PlanMismatch(ValueError):
    """The plan was made for another model (other groups, sizes or tasks)."""


def check_plan(model: MultiTaskModel, plan: PruningPlan) -> None:
    """Raise PlanMismatch unless the plan names exactly the model's tasks, groups and group sizes."""
    if set(plan.tasks) != set(model.task_names):
        raise PlanMismatch(f"plan is for tasks {list(plan.tasks)}, the model has heads {model.task_names}")
    sizes = analyse(model).sizes
    unknown = sorted(set(plan.group_sizes) - set(sizes))
    missing = sorted(set(sizes) - set(plan.group_sizes))
    if unknown or missing:
        raise PlanMismatch(f"plan does not match the model's channel groups: unknown to the model {unknown}, "
                           f"missing from the plan {missing}")
    wrong = {g: (plan.group_sizes[g], sizes[g]) for g in sizes if plan.group_sizes[g] != sizes[g]}
    if wrong:
        detail = ", ".join(f"{g}: plan {p} vs model {m}" for g, (p, m) in sorted(wrong.items()))
        raise PlanMismatch(f"plan group sizes differ from the model's ({detail}); was it built for another model "
                           "or applied twice?")


def apply_plan(model: MultiTaskModel, plan: PruningPlan) -> MultiTaskModel:
    """Prune `model` in place to the plan's kept channels; returns it."""
    check_plan(model, plan)
    removed = plan.pruned_groups()
    if removed:
        graph = build_graph(model)
        for name, idxs in removed.items():
            pruning_group(graph, model, name, idxs).prune()
    after = analyse(model).sizes
    wrong = [g for g, idxs in plan.keep.items() if after.get(g) != len(idxs)]
    if wrong:
        raise RuntimeError(f"pruning left groups {wrong} at sizes other than the plan's")
    return model


def compact_model(model: MultiTaskModel, plan: PruningPlan) -> MultiTaskModel:
    """A pruned copy of `model` (the original is untouched)."""
    return apply_plan(copy.deepcopy(model), plan)


# ----------------------------------------------------------------------------------------------------
# Unstructured masks


def unstructured_masks(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor] | str,
    sparsity: float,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """weight name -> bool mask (True = kept) removing the `sparsity` fraction of lowest-scored weights.

    `scores` maps every Conv2d/Linear weight name to per-weight scores (higher = more important), or
    names a data-free rule: "magnitude" (|w|) or "random" (uniform, seeded). The ranking is global over
    all those weights; exactly round(sparsity * total) weights are removed (ties broken by position).
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity!r} must be in [0, 1)")
    names = prunable_weight_names(model)
    params = dict(model.named_parameters())
    if isinstance(scores, str):
        scores = _data_free_scores(scores, {n: params[n] for n in names}, seed)
    missing = [n for n in names if n not in scores]
    if missing:
        raise ValueError(f"no scores for weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
    flat = torch.cat([scores[n].detach().reshape(-1).double().cpu() for n in names])
    if not torch.isfinite(flat).all():
        raise ValueError("unstructured scores must be finite")
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    masks, start = {}, 0
    for n in names:
        size = params[n].numel()
        masks[n] = keep[start:start + size].reshape(params[n].shape).to(params[n].device)
        start += size
    return masks


def _data_free_scores(rule: str, params: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    if rule == "magnitude":
        return {n: p.detach().abs() for n, p in params.items()}
    if rule == "random":
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
    raise ValueError(f"unknown data-free unstructured rule {rule!r}; use 'magnitude', 'random' or pass scores")


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], keep_masked: bool = True) -> list:
    """Zero the masked weights in place; with `keep_masked`, also zero their gradients during fine-tuning.

    Returns the gradient hook handles (remove them to stop enforcing the masks). Optimisers without
    weight decay on zero-gradient weights (SGD, Adam, AdamW) keep masked weights at exactly zero.
    """
    params = dict(model.named_parameters())
    handles = []
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.mul_(mask.to(p.dtype))
            if keep_masked:
                m = mask.to(p.dtype)
                handles.append(p.register_hook(lambda g, m=m: g * m))
    return handles


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over all Conv2d/Linear weights (DiSparse's convention)."""
    params = dict(model.named_parameters())
    total = zeros = 0
    for n in prunable_weight_names(model):
        total += params[n].numel()
        zeros += int((params[n] == 0).sum())
    return zeros / total if total else 0.0


__all__ = [
    "PlanMismatch",
    "apply_masks",
    "apply_plan",
    "check_plan",
    "compact_model",
    "recalibrate_batchnorm",
    "unstructured_masks",
    "weight_sparsity",
]


def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on `batches` (no weight changes, no gradients).

    Pruning channels shifts the statistics that downstream BatchNorms normalise with (the residual stream
    loses channels); a few forward passes in train mode with a cumulative average put them right again.
    Returns the model in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the given batches
    device = next(model.parameters()).device
    model.train()
    try:
        with torch.no_grad():
            for images, _ in batches:
                model(images.to(device))
    finally:
        for m, momentum in zip(bns, saved, strict=True):
            m.momentum = momentum
        model.eval()
    return model
