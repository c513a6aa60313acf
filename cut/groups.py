"""Channel groups of a multi-task model and an analytic cost model of its would-be compact versions.

A *channel group* is a set of channels that must be removed together (a conv's filters, its BN, every
consumer's input slices, residual partners), found by torch-pruning's DependencyGraph. Each head's final
classifier layers are never pruned, so their output channels never root a group.

Every group has a stable, serialisable name: the name of the first module (in `model.named_modules()`
order) among the members whose *output* channels the group removes. That name does not depend on which
heads are present, so a group is called the same in the full model, in every decomposed model and in
every process: plans and importance reports can name groups across the federation.

Which task a module serves comes from `model.task_of_module(name)` (None: shared trunk). The cost model
and the scoring criteria understand Conv2d (plain or depthwise), Linear and BatchNorm; a group that
also touches any other layer with parameters (attention, LayerNorm, GroupNorm, transposed or grouped
convolutions, embeddings, a bare nn.Parameter) is left whole and listed in `GroupAnalysis.kept_whole`
with the reason, so a plan never prunes channels whose cost or importance cut cannot measure. The
built-in models have no such layers.

The cost model records, for each Conv2d / Linear / BatchNorm, which group (if any) controls its input
and output channels, its kernel size, conv groups and output positions (from one forward pass). The
parameters and MACs of the compact model a plan would build then follow in closed form (numpy, a few
microseconds), so budget search never prunes a real model. The same pass records every Conv2d / Linear's
input and output shape (`LayerShape`), from which `cut.memory` sizes activations. The analysis is pure data
and is cached per (config json, parameter shapes): a pruned model with the same config gets its own entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from cut.models import MultiTaskModel


@dataclass(frozen=True)
class ParamSlice:
    """The channels of one parameter that belong to a group: `param[..., idxs, ...]` along `dim`.

    `root_idxs[i]` is the group channel that `idxs[i]` follows (identity in plain conv nets; torch-pruning
    maps indices through concat/flatten, so this keeps the general case right).
    """

    param: str
    dim: int
    idxs: np.ndarray
    root_idxs: np.ndarray
    is_weight: bool  # a Conv/Linear weight (not a bias, not a BN affine parameter)
    is_out: bool  # the group removes this module's output channels (else its input channels)

    @property
    def identity(self) -> bool:
        return len(self.idxs) == len(self.root_idxs) and bool(
            np.array_equal(self.idxs, self.root_idxs) and np.array_equal(self.idxs, np.arange(len(self.idxs)))
        )


@dataclass(frozen=True)
class ChannelGroup:
    name: str  # first out-channel module in named_modules order
    size: int  # channels of the group (out channels of `name`)
    shared: bool  # touches the backbone (or several heads)
    tasks: tuple[str, ...]  # tasks whose heads it touches (in model task order)
    out_modules: tuple[str, ...]  # Conv/Linear/BN whose output channels it removes
    in_modules: tuple[str, ...]  # Conv/Linear whose input channels it removes
    act_modules: tuple[str, ...]  # Conv/Linear among out_modules: where activations are scored
    slices: tuple[ParamSlice, ...]


@dataclass
class CostModel:
    """Closed-form params / MACs of the model for any number of kept channels per group.

    Each layer l contributes `a_l * in_l * out_l + b_l * out_l + c_l` parameters and
    `m_l * in_l * out_l + n_l * out_l` MACs, where in_l / out_l are either fixed or the kept count of the
    group that controls them. Depthwise convs have in_l fixed to 1 (their channels are out_l).
    """

    group_names: tuple[str, ...]
    group_sizes: np.ndarray
    in_group: np.ndarray  # per layer: group index or -1
    out_group: np.ndarray
    in_fixed: np.ndarray  # per layer: channels when not controlled by a group
    out_fixed: np.ndarray
    a: np.ndarray
    b: np.ndarray
    m: np.ndarray
    n: np.ndarray
    const_params: int  # parameters outside the modelled layers and constant terms
    dense_params: int = 0
    dense_macs: int = 0
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {name: i for i, name in enumerate(self.group_names)}
        self.dense_params, self.dense_macs = self.evaluate(self.group_sizes)

    def counts_vector(self, counts: Mapping[str, int] | None = None) -> np.ndarray:
        """Kept channels per group as a vector (groups not named keep all channels)."""
        k = self.group_sizes.astype(np.float64).copy()
        for name, c in (counts or {}).items():
            if name not in self.index:
                raise KeyError(f"cost model: unknown channel group {name!r}")
            k[self.index[name]] = c
        return k

    def evaluate(self, kept: np.ndarray) -> tuple[int, int]:
        """(params, MACs) for `kept[i]` channels in group i."""
        kept = np.asarray(kept, dtype=np.float64)
        ext = np.append(kept, 0.0)  # index -1 reads the padding; masked below
        cin = np.where(self.in_group >= 0, ext[self.in_group], self.in_fixed)
        cout = np.where(self.out_group >= 0, ext[self.out_group], self.out_fixed)
        io = cin * cout
        params = float(self.a @ io + self.b @ cout) + self.const_params
        macs = float(self.m @ io + self.n @ cout)
        return int(round(params)), int(round(macs))

    def cost(self, kind: str, kept: np.ndarray) -> int:
        params, macs = self.evaluate(kept)
        if kind == "params":
            return params
        if kind == "macs":
            return macs
        raise ValueError(f"budget kind {kind!r} is not modelled; use 'params' or 'macs'")

    def dense(self, kind: str) -> int:
        return self.cost(kind, self.group_sizes)

    def params(self, counts: Mapping[str, int] | None = None) -> int:
        return self.evaluate(self.counts_vector(counts))[0]

    def macs(self, counts: Mapping[str, int] | None = None) -> int:
        return self.evaluate(self.counts_vector(counts))[1]


@dataclass(frozen=True)
class LayerShape:
    """One Conv2d / Linear as one image at the config's input size runs through it: its channels, the
    positions (H*W, or tokens; 1 for a vector) of its input and output, and the groups (index into
    `GroupAnalysis.groups`, -1: fixed) that control its input and output channels. A depthwise conv's
    input channels follow its output group. What activation-size cost models need (`cut.memory`)."""

    name: str
    in_channels: int
    out_channels: int
    in_positions: int
    out_positions: int
    in_group: int
    out_group: int


@dataclass(frozen=True)
class GroupAnalysis:
    groups: tuple[ChannelGroup, ...]
    cost: CostModel
    task_names: tuple[str, ...]
    kept_whole: Mapping[str, str] = field(default_factory=dict)  # group root -> why it is never pruned
    layers: tuple[LayerShape, ...] = ()  # every Conv2d / Linear, in forward order

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    def by_name(self) -> dict[str, ChannelGroup]:
        return {g.name: g for g in self.groups}

    def groups_of_task(self, task: str) -> list[ChannelGroup]:
        """Groups whose channels matter to `task`: every shared group and the task's own head groups."""
        return [g for g in self.groups if g.shared or task in g.tasks]


_CACHE: dict[tuple, GroupAnalysis] = {}


def example_input(model: MultiTaskModel, batch: int = 1) -> torch.Tensor:
    cfg = model.config
    device = next(model.parameters()).device
    return torch.zeros(batch, cfg.in_channels, *cfg.input_size, device=device)


def build_graph(model: MultiTaskModel) -> tp.DependencyGraph:
    """Trace `model` in eval mode (so BN running statistics are untouched) with autograd enabled."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # Classifiers are excluded when listing groups, not when tracing: ignoring them in the trace
            # would drop the convs that separate the branches of a head and couple their channels.
            return tp.DependencyGraph().build_dependency(model, example_input(model), verbose=False)
    finally:
        model.train(was_training)


def _cache_key(model: MultiTaskModel) -> tuple:
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return model.config.to_json(), shapes


def analyse(model: MultiTaskModel) -> GroupAnalysis:
    """Channel groups and cost model of `model` (cached per config and parameter shapes)."""
    key = _cache_key(model)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    dg = build_graph(model)
    groups, kept_whole = _collect_groups(model, dg)
    cost, layers = _cost_model(model, groups)
    result = GroupAnalysis(groups=groups, cost=cost, task_names=tuple(model.task_names), kept_whole=kept_whole,
                           layers=layers)
    _CACHE[key] = result
    return result


def pruning_group(dg: tp.DependencyGraph, model: nn.Module, name: str, idxs: list[int]):
    """torch-pruning group that removes channels `idxs` of the group rooted at module `name`."""
    module = model.get_submodule(name)
    pruner = dg.get_pruner_of_module(module)
    return dg.get_pruning_group(module, pruner.prune_out_channels, idxs)


def _collect_groups(model: MultiTaskModel, dg: tp.DependencyGraph) -> tuple[tuple[ChannelGroup, ...], dict[str, str]]:
    """The prunable groups (in named_modules order) and the groups left whole, with the reason."""
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    unmodelled = {m: why for m, n in names.items() if (why := _unmodelled(m)) is not None}
    found, kept_whole = [], {}
    for group in dg.get_all_groups(ignored_layers=model.classifier_layers()):
        outs = [names[it.dep.target.module] for it in group
                if it.dep.target.module in names and dg.is_out_channel_pruning_fn(it.dep.handler)]
        if not outs:
            continue
        name = min(outs, key=order.__getitem__)
        blocked = _blocking_members(group, names, unmodelled)
        if blocked:
            kept_whole[name] = "; ".join(blocked)
            continue
        size = dg.get_out_channels(model.get_submodule(name))
        # Re-root at the named module so root indices are that module's channels.
        found.append(_describe(model, dg, pruning_group(dg, model, name, list(range(size))), name, size, names))
    found.sort(key=lambda g: order[g.name])
    return tuple(found), kept_whole


def _unmodelled(module: nn.Module) -> str | None:
    """Why channels through `module` cannot be pruned by cut (None: they can, or it has no parameters)."""
    if isinstance(module, nn.Conv2d):
        return f"grouped convolution (groups={module.groups})" if module.groups > 1 and not _is_depthwise(module) else None
    if isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm)):
        return None
    if any(True for _ in module.parameters(recurse=False)):
        return f"{type(module).__name__} is not modelled"
    return None


def _blocking_members(group, names: dict, unmodelled: dict) -> list[str]:
    """Members of a torch-pruning group that cut cannot prune, as 'module: reason' (empty: prunable)."""
    out = []
    for it in group:
        module = it.dep.target.module
        if isinstance(module, nn.Parameter):
            out.append("a bare nn.Parameter (outside any layer) is not modelled")
        elif module in names and module in unmodelled:
            out.append(f"{names[module]}: {unmodelled[module]}")
    return list(dict.fromkeys(out))


def _describe(model, dg, group, name: str, size: int, names: dict) -> ChannelGroup:
    outs, ins, slices = [], [], []
    for it in group:
        module = it.dep.target.module
        if module not in names:
            continue
        mname = names[module]
        is_out = dg.is_out_channel_pruning_fn(it.dep.handler)
        (outs if is_out else ins).append(mname)
        slices.extend(_param_slices(module, mname, is_out, it.idxs, it.root_idxs))
    touched = outs + ins
    owners = [model.task_of_module(n) for n in touched]
    tasks = tuple(t for t in model.task_names if t in owners)
    shared = None in owners or len(tasks) > 1
    acts = tuple(n for n in dict.fromkeys(outs) if isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear)))
    return ChannelGroup(
        name=name, size=size, shared=shared, tasks=tasks, out_modules=tuple(dict.fromkeys(outs)),
        in_modules=tuple(dict.fromkeys(ins)), act_modules=acts, slices=tuple(slices),
    )


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _param_slices(module: nn.Module, mname: str, is_out: bool, idxs, root_idxs) -> list[ParamSlice]:
    idx = np.asarray(idxs, dtype=np.int64)
    root = np.asarray(root_idxs, dtype=np.int64)
    out: list[ParamSlice] = []
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not _is_depthwise(module):
            raise NotImplementedError(f"{mname}: grouped (non-depthwise) convolutions are not supported")
        wdim = 0 if (is_out or _is_depthwise(module)) else 1
        out.append(ParamSlice(f"{mname}.weight", wdim, idx, root, True, is_out))
        if is_out and module.bias is not None:
            out.append(ParamSlice(f"{mname}.bias", 0, idx, root, False, True))
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        out.append(ParamSlice(f"{mname}.weight", 0, idx, root, False, True))
        out.append(ParamSlice(f"{mname}.bias", 0, idx, root, False, True))
    return out


def probe_layers(model: nn.Module, record) -> None:
    """One eval-mode forward pass on zeros, calling `record(name, module, inputs, output)` for every Conv2d /
    Linear; the model's training flag is restored. Shapes per layer are what cost models need."""
    handles = [m.register_forward_hook(lambda mod, inputs, output, n=n: record(n, mod, inputs, output))
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input(model))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _layer_positions(model: MultiTaskModel) -> dict[str, tuple[int, int]]:
    """(input, output) positions (H*W, or 1 for a Linear on vectors) of every Conv2d / Linear for one image,
    in forward order."""
    positions: dict[str, tuple[int, int]] = {}

    def record(n, mod, inputs, output) -> None:
        cin, cout = (mod.in_channels, mod.out_channels) if isinstance(mod, nn.Conv2d) else (mod.in_features,
                                                                                            mod.out_features)
        batch = output.shape[0]
        positions[n] = (inputs[0].numel() // (batch * cin), output.numel() // (batch * cout))

    probe_layers(model, record)
    return positions


def _cost_model(model: MultiTaskModel, groups: tuple[ChannelGroup, ...]) -> tuple[CostModel, tuple[LayerShape, ...]]:
    gidx = {g.name: i for i, g in enumerate(groups)}
    in_of, out_of = {}, {}
    for g in groups:
        for n in g.out_modules:
            out_of[n] = gidx[g.name]
        for n in g.in_modules:
            in_of[n] = gidx[g.name]
    both = _layer_positions(model)
    positions = {n: out for n, (_, out) in both.items()}
    layers = tuple(_layer_shape(n, model.get_submodule(n), p, in_of, out_of) for n, p in both.items())
    rows = []
    modelled = 0
    for n, m in model.named_modules():
        row = _layer_row(n, m, in_of, out_of, positions)
        if row is not None:
            rows.append(row)
            modelled += sum(p.numel() for p in m.parameters(recurse=False))
    cols = list(zip(*rows, strict=True)) if rows else [()] * 8
    const = sum(p.numel() for p in model.parameters()) - modelled
    arr = [np.asarray(c, dtype=np.float64) for c in cols]
    return CostModel(
        group_names=tuple(g.name for g in groups),
        group_sizes=np.asarray([g.size for g in groups], dtype=np.float64),
        in_group=arr[0].astype(np.int64), out_group=arr[1].astype(np.int64),
        in_fixed=arr[2], out_fixed=arr[3], a=arr[4], b=arr[5], m=arr[6], n=arr[7],
        const_params=int(const),
    ), layers


def _layer_shape(n: str, m: nn.Module, positions: tuple[int, int], in_of: dict, out_of: dict) -> LayerShape:
    og = out_of.get(n, -1)
    if isinstance(m, nn.Conv2d):
        cin, cout = m.in_channels, m.out_channels
        ig = og if _is_depthwise(m) else in_of.get(n, -1)
    else:
        cin, cout, ig = m.in_features, m.out_features, in_of.get(n, -1)
    return LayerShape(n, int(cin), int(cout), int(positions[0]), int(positions[1]), int(ig), int(og))


def _layer_row(n: str, m: nn.Module, in_of: dict, out_of: dict, positions: dict) -> tuple | None:
    """(in_group, out_group, in_fixed, out_fixed, a, b, m, n) of one layer, or None if not modelled."""
    og = out_of.get(n, -1)
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1]
        bias = 1.0 if m.bias is not None else 0.0
        pos = positions.get(n, 0)
        if _is_depthwise(m):  # channels follow the output; one input channel per filter
            return (-1, og, 1, m.out_channels, 0.0, k + bias, 0.0, k * pos)
        return (in_of.get(n, -1), og, m.in_channels, m.out_channels, k / m.groups, bias, k * pos / m.groups, 0.0)
    if isinstance(m, nn.Linear):
        bias = 1.0 if m.bias is not None else 0.0
        pos = positions.get(n, 0)
        return (in_of.get(n, -1), og, m.in_features, m.out_features, 1.0, bias, float(pos), 0.0)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
        return (-1, og, 0, m.num_features, 0.0, 2.0, 0.0, 0.0)
    return None


def counts_of_keep(keep: Mapping[str, tuple[int, ...] | list[int]]) -> dict[str, int]:
    return {name: len(idxs) for name, idxs in keep.items()}


__all__ = [
    "ChannelGroup",
    "CostModel",
    "GroupAnalysis",
    "LayerShape",
    "ParamSlice",
    "analyse",
    "build_graph",
    "counts_of_keep",
    "example_input",
    "probe_layers",
    "pruning_group",
]
