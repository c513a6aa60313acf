"""Per-task importance of every channel group, from a model's weights and a few batches of data.

CUT scores each selected task separately (step 2): for task t and channel group g, one non-negative score
per channel of g says how much t's loss depends on that channel. Scores are computed on the pre-trained
weights (nothing is trained), with the model in eval mode so BatchNorm uses (and keeps) its running
statistics.

Criteria form a registry (name -> function with one signature, `Criterion`). A criterion receives a
`ScoringContext` naming the model, its channel groups, the batches and the *objectives* to score: one
loss per task (CUT, DiSparse) or one summed loss (SNIP-style baselines). Each batch is forwarded once;
each objective then gets one backward pass on the retained graph, so a batch costs one forward plus one
backward per task. Only per-channel sums are kept across batches (plus one accumulated gradient per task
for taylor/saliency), never per-sample gradients, so memory does not grow with the number of batches.

| criterion | score of channel c (sums over the group's parameter slices of c) |
|---|---|
| taylor    | abs(sum w * G), G = dL/dw accumulated over batches (group first-order Taylor) |
| saliency  | sum abs(w * G): SNIP's per-weight saliency summed per channel |
| fisher    | sum over batches of (sum w * g_batch)^2 (group Fisher) |
| act-grad  | mean over samples of abs(mean over positions of a * dL/da) at the group's conv/linear outputs |
| magnitude | sum abs(w) over the group's conv/linear weight slices (data-free) |
| random    | uniform floats in [0, 1), seeded by (seed, objective, group name) (data-free) |

`random` returns floats, not a permutation of integers: torch-pruning's RandomImportance returns shuffled
integers, whose ranges grow with group size and so bias global ranking against small groups.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cut.groups import ChannelGroup, GroupAnalysis, analyse
from cut.models import MultiTaskModel

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]
Scores = dict[str, np.ndarray]  # group name -> one float32 score per channel
Objective = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
SUMMED = "sum"  # objective name of the summed-loss variant


@dataclass
class ScoringContext:
    model: MultiTaskModel
    analysis: GroupAnalysis
    batches: list[Batch]
    objectives: dict[str, Objective]  # objective name (a task, or SUMMED) -> scalar loss
    groups: dict[str, list[ChannelGroup]]  # objective -> the groups scored for it
    seed: int = 0


Criterion = Callable[[ScoringContext], dict[str, Scores]]
CRITERIA: dict[str, Criterion] = {}
DATA_FREE = {"magnitude", "random"}


def register(name: str) -> Callable[[Criterion], Criterion]:
    def deco(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------------------------------
# Public API


def take_batches(loader: Iterable[Batch], num_batches: int) -> list[Batch]:
    """The first `num_batches` batches of a loader (or of a list of batches)."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= num_batches:
            break
    if not out:
        raise ValueError("the loader yielded no batch to score on")
    return out


def task_objective(model: MultiTaskModel, task: str) -> Objective:
    spec = model.config.task(task)
    return lambda outputs, targets: spec.loss(outputs[task], targets[task])


def summed_objective(model: MultiTaskModel, tasks: list[str]) -> Objective:
    """The weighted sum of the selected tasks' losses (the training objective of the decomposed model)."""
    specs = [model.config.task(t) for t in tasks]
    return lambda outputs, targets: sum(s.loss_weight * s.loss(outputs[s.name], targets[s.name]) for s in specs)


def score_tasks(
    model: MultiTaskModel,
    loader: Iterable[Batch] | None,
    tasks: list[str],
    criterion: str = "taylor",
    num_batches: int = 4,
    seed: int = 0,
) -> dict[str, Scores]:
    """task -> group -> per-channel scores; each task scores the shared groups and its own head's groups."""
    _check_tasks(model, tasks)
    analysis = analyse(model)
    objectives = {t: task_objective(model, t) for t in tasks}
    groups = {t: analysis.groups_of_task(t) for t in tasks}
    return _score(model, analysis, loader, criterion, num_batches, seed, objectives, groups)


def score_summed(
    model: MultiTaskModel,
    loader: Iterable[Batch] | None,
    tasks: list[str],
    criterion: str = "taylor",
    num_batches: int = 4,
    seed: int = 0,
) -> Scores:
    """group -> per-channel scores of the summed loss of `tasks` (SNIP-style baselines), every group."""
    _check_tasks(model, tasks)
    analysis = analyse(model)
    objectives = {SUMMED: summed_objective(model, tasks)}
    groups = {SUMMED: [g for g in analysis.groups if g.shared or set(g.tasks) & set(tasks)]}
    return _score(model, analysis, loader, criterion, num_batches, seed, objectives, groups)[SUMMED]


def _score(model, analysis, loader, criterion: str, num_batches: int, seed: int, objectives, groups):
    ctx = ScoringContext(model=model, analysis=analysis, batches=_batches_for(criterion, loader, num_batches),
                         objectives=objectives, groups=groups, seed=seed)
    return run_criterion(criterion, ctx)


def run_criterion(name: str, ctx: ScoringContext) -> dict[str, Scores]:
    if name not in CRITERIA:
        raise ValueError(f"unknown importance criterion {name!r}; known: {', '.join(sorted(CRITERIA))}")
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        result = CRITERIA[name](ctx)
    finally:
        ctx.model.train(was_training)
    for objective, scores in result.items():
        validate_scores(scores, ctx.analysis.sizes, where=f"{name} scores of {objective!r}")
    return result


def validate_scores(scores: Mapping[str, np.ndarray], sizes: Mapping[str, int], where: str = "scores") -> None:
    """Raise ValueError unless every vector names a known group, has its length and is finite and >= 0."""
    for group, vec in scores.items():
        if group not in sizes:
            raise ValueError(f"{where}: unknown channel group {group!r}")
        arr = np.asarray(vec)
        if arr.shape != (sizes[group],):
            raise ValueError(f"{where}: group {group!r} has {arr.shape} scores, expected ({sizes[group]},)")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: group {group!r} has non-finite scores (a NaN/inf loss?)")
        if np.any(arr < 0):
            raise ValueError(f"{where}: group {group!r} has negative scores")


def weight_scores(
    model: MultiTaskModel, batches: list[Batch], objectives: Mapping[str, Objective]
) -> dict[str, dict[str, torch.Tensor]]:
    """objective -> Conv2d/Linear weight name -> per-weight |w * G| (G accumulated over batches).

    The per-weight saliency of SNIP and DiSparse, for unstructured masks. Weights that an objective does
    not reach (another task's head) are left out of that objective's dict.
    """
    params = {n: p for n, p in model.named_parameters() if n in set(prunable_weight_names(model))}
    grads = _accumulated_grads(model, batches, objectives, params)
    return {obj: {n: (params[n].detach() * g).abs() for n, g in per.items()} for obj, per in grads.items()}


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Weights of every Conv2d and Linear (DiSparse's sparsity convention: BN and biases excluded)."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ----------------------------------------------------------------------------------------------------
# Criteria


@register("taylor")
def taylor(ctx: ScoringContext) -> dict[str, Scores]:
    totals: dict[str, Scores] = {obj: {} for obj in ctx.objectives}
    for obj, sums in _per_batch_channel_sums(ctx):
        for group, vec in sums.items():
            totals[obj][group] = totals[obj].get(group, 0.0) + vec
    return {obj: {g: np.abs(v).astype(np.float32) for g, v in s.items()} for obj, s in totals.items()}


@register("saliency")
def saliency(ctx: ScoringContext) -> dict[str, Scores]:
    grads = _accumulated_grads(ctx.model, ctx.batches, ctx.objectives, _group_params(ctx))
    return {
        obj: _channel_sums(ctx, ctx.groups[obj], {n: v.abs() for n, v in _times_weight(ctx, g).items()})
        for obj, g in grads.items()
    }


@register("fisher")
def fisher(ctx: ScoringContext) -> dict[str, Scores]:
    totals: dict[str, Scores] = {obj: {} for obj in ctx.objectives}
    for obj, sums in _per_batch_channel_sums(ctx):
        for group, vec in sums.items():
            totals[obj][group] = totals[obj].get(group, 0.0) + vec**2
    return {obj: {g: v.astype(np.float32) for g, v in s.items()} for obj, s in totals.items()}


@register("act-grad")
def act_grad(ctx: ScoringContext) -> dict[str, Scores]:
    modules = sorted({m for gs in ctx.groups.values() for g in gs for m in g.act_modules})
    totals: dict[str, dict[str, torch.Tensor]] = {obj: {} for obj in ctx.objectives}
    samples = 0
    for batch_acts, batch_grads in _activation_grads(ctx, modules):
        samples += next(iter(batch_acts.values())).shape[0]
        for obj, grads in batch_grads.items():
            for name, g in grads.items():
                a = batch_acts[name]
                if a.dim() > 2 and _channel_dim(ctx.model.get_submodule(name)) != 1:  # tokens: channels last
                    a, g = a.movedim(-1, 1), g.movedim(-1, 1)
                per_sample = (a.detach() * g).flatten(2).mean(2) if a.dim() > 2 else a.detach() * g
                totals[obj][name] = totals[obj].get(name, 0.0) + per_sample.abs().sum(0)
    out: dict[str, Scores] = {}
    for obj, groups in ctx.groups.items():
        out[obj] = {}
        for g in groups:
            vec = np.zeros(g.size, dtype=np.float64)
            for name in g.act_modules:
                if name in totals[obj]:
                    s = _slice_of(g, f"{name}.weight")
                    np.add.at(vec, s.root_idxs, totals[obj][name].double().cpu().numpy()[s.idxs] / samples)
            out[obj][g.name] = vec.astype(np.float32)
    return out


@register("magnitude")
def magnitude(ctx: ScoringContext) -> dict[str, Scores]:
    weights = {n: p.detach().abs() for n, p in _group_params(ctx).items()}
    return {obj: _channel_sums(ctx, groups, weights, weights_only=True) for obj, groups in ctx.groups.items()}


@register("random")
def random(ctx: ScoringContext) -> dict[str, Scores]:
    out: dict[str, Scores] = {}
    for obj, groups in ctx.groups.items():
        out[obj] = {}
        for g in groups:
            rng = np.random.default_rng([ctx.seed, zlib.crc32(obj.encode()), zlib.crc32(g.name.encode())])
            out[obj][g.name] = rng.random(g.size, dtype=np.float32)
    return out


# ----------------------------------------------------------------------------------------------------
# Helpers


def _check_tasks(model: MultiTaskModel, tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in model.task_names]
    if unknown or not tasks:
        raise ValueError(f"cannot score tasks {tasks}: the model has heads {model.task_names}")


def _batches_for(criterion: str, loader: Iterable[Batch] | None, num_batches: int) -> list[Batch]:
    if criterion in DATA_FREE:
        return []
    if loader is None:
        raise ValueError(f"criterion {criterion!r} needs data: pass a loader")
    return loader if isinstance(loader, list) and len(loader) <= num_batches else take_batches(loader, num_batches)


def _group_params(ctx: ScoringContext) -> dict[str, nn.Parameter]:
    names = {s.param for gs in ctx.groups.values() for g in gs for s in g.slices}
    return {n: p for n, p in ctx.model.named_parameters() if n in names}


def _forward(model: nn.Module, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    device = next(model.parameters()).device
    images, targets = batch
    return model(images.to(device)), {k: v.to(device) for k, v in targets.items()}


def _per_batch_grads(model, batches, objectives, params: Mapping[str, nn.Parameter]):
    """Yields (objective, {param name: dL/dparam}) per batch: one forward, one backward per objective."""
    names, tensors = list(params), list(params.values())
    objs = list(objectives.items())
    with torch.enable_grad():
        for batch in batches:
            outputs, targets = _forward(model, batch)
            for i, (obj, loss_fn) in enumerate(objs):
                loss = loss_fn(outputs, targets)
                grads = torch.autograd.grad(loss, tensors, retain_graph=i < len(objs) - 1, allow_unused=True)
                yield obj, {n: g for n, g in zip(names, grads, strict=True) if g is not None}


def _accumulated_grads(model, batches, objectives, params) -> dict[str, dict[str, torch.Tensor]]:
    total: dict[str, dict[str, torch.Tensor]] = {obj: {} for obj in objectives}
    for obj, grads in _per_batch_grads(model, batches, objectives, params):
        for n, g in grads.items():
            total[obj][n] = total[obj][n] + g if n in total[obj] else g.clone()
    return total


def _times_weight(ctx: ScoringContext, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(ctx.model.named_parameters())
    return {n: params[n].detach() * g for n, g in grads.items()}


def _reduce_to(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dimension but `dim`."""
    others = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=others) if others else t


def _channel_sums(
    ctx: ScoringContext,
    groups: list[ChannelGroup],
    values: Mapping[str, torch.Tensor],
    absolute: bool = False,
    weights_only: bool = False,
) -> Scores:
    """group -> per-channel sum of `values` over the group's parameter slices (abs of the sum if asked)."""
    cache: dict[tuple[str, int], np.ndarray] = {}
    out: Scores = {}
    for g in groups:
        vec = np.zeros(g.size, dtype=np.float64)
        for s in g.slices:
            if s.param not in values or (weights_only and not s.is_weight):
                continue
            key = (s.param, s.dim)
            if key not in cache:
                cache[key] = _reduce_to(values[s.param], s.dim).double().cpu().numpy()
            if s.identity:
                vec += cache[key]
            else:
                np.add.at(vec, s.root_idxs, cache[key][s.idxs])
        out[g.name] = (np.abs(vec) if absolute else vec).astype(np.float32)
    return out


def _per_batch_channel_sums(ctx: ScoringContext):
    """Yields (objective, {group: per-channel sum of w * dL/dw over the group's parameters}) per batch.

    Computed from activations, without any weight gradient (backward passes then skip the weight-gradient
    half of every conv): for a layer y = f(x; w) that is linear in its per-channel parameters,
    sum over channel c's output parameters of w * dL/dw = sum over positions of y_c * dL/dy_c (conv and
    linear weights with their bias, BN scale with its shift), and sum over channel c's input slice of a
    consumer's weight of w * dL/dw = sum over positions of x_c * (dL/dx_c through that consumer only).
    The input is aliased per consumer (a view) so autograd reports the gradient through it alone.
    """
    terms = _activation_terms(ctx)
    for batch_terms in _captured_grads(ctx, sorted({t[:2] for gs in terms.values() for t in gs})):
        for obj, per_term in batch_terms.items():
            sums: Scores = {}
            for g in ctx.groups[obj]:
                vec = np.zeros(g.size, dtype=np.float64)
                for module, io, idxs, root in terms[g.name]:
                    if (module, io) in per_term:
                        np.add.at(vec, root, per_term[(module, io)][idxs])
                sums[g.name] = vec
            yield obj, sums


def _activation_terms(ctx: ScoringContext) -> dict[str, list[tuple[str, str, np.ndarray, np.ndarray]]]:
    """group -> (module, "out"|"in", idxs, root_idxs): one term per module whose channels it removes."""
    out = {}
    for gs in ctx.groups.values():
        for g in gs:
            out[g.name] = [(s.param[: -len(".weight")], "out" if s.is_out else "in", s.idxs, s.root_idxs)
                           for s in g.slices if s.param.endswith(".weight")]
    return out


def _captured_grads(ctx: ScoringContext, keys: list[tuple[str, str]]):
    """Per batch: {objective: {(module, io): per-channel sum of activation * its gradient}}.

    Outputs are captured before any in-place activation can overwrite them (the model goes on with a
    copy); inputs are captured as a per-consumer alias.
    """
    captured: dict[tuple[str, str], torch.Tensor] = {}
    channel_dims = {k: _channel_dim(ctx.model.get_submodule(k[0])) for k in keys}
    handles = []
    for module_name, io in keys:
        module = ctx.model.get_submodule(module_name)
        if io == "out":
            def out_hook(_m, _i, output, key=(module_name, io)):
                captured[key] = output
                return output.clone()
            handles.append(module.register_forward_hook(out_hook))
        else:
            def in_hook(_m, inputs, key=(module_name, io)):
                alias = inputs[0].view_as(inputs[0])
                captured[key] = alias
                return (alias, *inputs[1:])
            handles.append(module.register_forward_pre_hook(in_hook))
    objs = list(ctx.objectives.items())
    try:
        with torch.enable_grad():
            for batch in ctx.batches:
                captured.clear()
                outputs, targets = _forward(ctx.model, batch)
                names = [k for k in keys if k in captured and captured[k].requires_grad]
                per_obj = {}
                for i, (obj, loss_fn) in enumerate(objs):
                    grads = torch.autograd.grad(loss_fn(outputs, targets), [captured[k] for k in names],
                                                retain_graph=i < len(objs) - 1, allow_unused=True)
                    per_obj[obj] = {k: _channel_product(captured[k], g, channel_dims[k])
                                    for k, g in zip(names, grads, strict=True) if g is not None}
                yield per_obj
    finally:
        for h in handles:
            h.remove()


def _channel_dim(module: nn.Module) -> int:
    """Where a module's activations hold channels: dim 1 (N, C, ...), or last for a Linear ((N, ..., C) tokens)."""
    return -1 if isinstance(module, nn.Linear) else 1


def _channel_product(a: torch.Tensor, g: torch.Tensor, channel_dim: int = 1) -> np.ndarray:
    """Per channel (dim `channel_dim`) sum of a * g over the batch and every position."""
    prod = a.detach() * g
    channel_dim %= prod.dim()
    dims = [d for d in range(prod.dim()) if d != channel_dim]
    return prod.sum(dim=dims).double().cpu().numpy()


def _slice_of(group: ChannelGroup, param: str):
    for s in group.slices:
        if s.param == param and s.is_out:
            return s
    raise KeyError(f"group {group.name!r} has no output slice of {param!r}")


def _activation_grads(ctx: ScoringContext, modules: list[str]):
    """Yields, per batch, ({module: output}, {objective: {module: dL/doutput}}): one forward per batch.

    A Linear followed by an in-place ReLU hands over the ReLU output; a * dL/da is unchanged by that
    (both factors are zero where the ReLU clips), so the score is the same as on the pre-activation.
    """
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for name in modules:
        def hook(_m, _i, output, name=name):
            acts[name] = output
        handles.append(ctx.model.get_submodule(name).register_forward_hook(hook))
    objs = list(ctx.objectives.items())
    try:
        with torch.enable_grad():
            for batch in ctx.batches:
                acts.clear()
                outputs, targets = _forward(ctx.model, batch)
                names = list(acts)
                per_obj = {}
                for i, (obj, loss_fn) in enumerate(objs):
                    loss = loss_fn(outputs, targets)
                    grads = torch.autograd.grad(
                        loss, [acts[n] for n in names], retain_graph=i < len(objs) - 1, allow_unused=True
                    )
                    per_obj[obj] = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
                yield dict(acts), per_obj
    finally:
        for h in handles:
            h.remove()


__all__ = [
    "CRITERIA",
    "SUMMED",
    "Batch",
    "Criterion",
    "ScoringContext",
    "Scores",
    "prunable_weight_names",
    "register",
    "run_criterion",
    "score_summed",
    "score_tasks",
    "summed_objective",
    "take_batches",
    "task_objective",
    "validate_scores",
    "weight_scores",
]
