"""Bring your own model: any multi-task nn.Module whose forward returns {task: output}, for cut's engine.

cut's engine (channel groups, scoring, fusion, planning, compaction, recovery) reads a few things of a
model: `config` (each task's loss, one sample's input shape, a cache key), `task_names`,
`classifier_layers()` (the layers whose outputs are predictions: never pruned), `task_of_module(name)`
(which task's head a module belongs to; None for the shared trunk) and `decompose(tasks)`.
`MultiTaskModel` has them; `TaskModel` gives them to a user's own module, held as its only child `net`
(so channel groups and plans name modules `net.<the user's module name>`).

`wrap(net, tasks, heads, input_shape)` checks the model up front (a dict output naming every task, heads
that exist, are disjoint and are called) and finds each head's classifier: the last Conv2d / Linear it
runs. Decomposing keeps the user's class and forward: each dropped head is replaced by a `DroppedHead`
(no parameters, no compute; it returns zeros shaped like that head's output, worked out on the meta
device, so any forward still runs) and a forward hook (`KeepTasks`) removes the dropped tasks from the
output dict. `unwrap(model)` hands back the user's module.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_KINDS = ("classification", "segmentation", "regression")
IGNORE_INDEX = 255  # class label that the default classification loss ignores (as the built-in segmentation task)


class UnsupportedModel(ValueError):
    """A model cut cannot prune as given; the message names the module and what to change."""


def _cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.long()
    if (target != IGNORE_INDEX).sum() == 0:
        return pred.sum() * 0.0
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)


def _l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = pred.reshape(target.shape)
    valid = torch.isfinite(target)
    return (pred[valid] - target[valid]).abs().mean() if valid.any() else pred.sum() * 0.0


@dataclass(frozen=True)
class UserTask:
    """One task of a user's model: its name and loss.

    `kind` "classification" / "segmentation" (cross-entropy on class scores, per image or per pixel, label
    255 ignored; distillation by KL), "regression" (L1 over finite targets) or "custom" (`loss_fn`).
    """

    name: str
    kind: str = "classification"
    loss_fn: Loss | None = None
    loss_weight: float = 1.0

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(pred, target)
        if self.kind == "custom":
            raise ValueError(f"task {self.name!r} has a custom loss that was not given (losses are not saved)")
        return _l1(pred, target) if self.kind == "regression" else _cross_entropy(pred, target)


def make_tasks(tasks: Sequence[str] | Mapping[str, str | Loss], targets: Mapping[str, torch.Tensor] | None = None,
               ) -> tuple[UserTask, ...]:
    """UserTasks from task names (kind from the target dtype: integer -> classification, else regression) or a
    mapping task -> kind name or loss callable."""
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names or a mapping, not the string {tasks!r}")
    out = []
    for name in tasks:
        how = tasks[name] if isinstance(tasks, Mapping) else None
        if callable(how):
            out.append(UserTask(name, "custom", how))
        elif how is not None:
            if how not in LOSS_KINDS:
                raise ValueError(f"task {name!r}: unknown loss kind {how!r}; use one of {LOSS_KINDS} or a callable")
            out.append(UserTask(name, how))
        else:
            target = (targets or {}).get(name)
            floating = target is not None and torch.is_floating_point(target)
            out.append(UserTask(name, "regression" if floating else "classification"))
    if not out or len({t.name for t in out}) != len(out):
        raise ValueError(f"tasks must name at least one task, each once: {list(tasks)}")
    return tuple(out)


@dataclass(frozen=True)
class TaskModelConfig:
    """What cut's engine reads of a user's model (duck-types `ModelConfig`)."""

    tasks: tuple[UserTask, ...]
    heads: tuple[tuple[str, tuple[str, ...]], ...]  # task -> names of its head modules inside `net`
    classifiers: tuple[str, ...]  # modules inside `net` whose outputs are predictions
    input_shape: tuple[int, ...]  # one sample, e.g. (3, 64, 64)
    model_class: str

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.input_shape[1:])

    def task(self, name: str) -> UserTask:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"task {name!r} not in model tasks {self.task_names}")

    def heads_of(self, task: str) -> tuple[str, ...]:
        return dict(self.heads)[task]

    def with_tasks(self, names: Sequence[str]) -> TaskModelConfig:
        heads = dict(self.heads)
        keep = {c for t in names for h in heads[t] for c in self.classifiers if _inside(c, h)}
        return replace(self, tasks=tuple(self.task(n) for n in names), heads=tuple((n, heads[n]) for n in names),
                       classifiers=tuple(c for c in self.classifiers if c in keep))

    def to_dict(self) -> dict:
        return {"tasks": [{"name": t.name, "kind": t.kind, "loss_weight": t.loss_weight} for t in self.tasks],
                "heads": [[t, list(h)] for t, h in self.heads], "classifiers": list(self.classifiers),
                "input_shape": list(self.input_shape), "model_class": self.model_class}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class DroppedHead(nn.Module):
    """Stands in for the head of a task that `decompose` dropped: no parameters and no real compute.

    It returns zeros shaped like the dropped head's output, so the model's own forward runs unchanged;
    `KeepTasks` then removes the task from the output. The shape comes from running a parameter-free copy
    of the head on the meta device. Pruning the trunk narrows the head's input, which the copy would
    refuse, so the copy is fed the input it was built for (`input_shapes`, one sample each): the actual
    input with channels (dim 1, else the last dim) set back to the original width, else the original input.
    """

    def __init__(self, head: nn.Module, task: str, input_shapes: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        self.task = task
        self.input_shapes = [tuple(s) for s in input_shapes]
        # Not a submodule: it holds no weights, is not in state_dict and is not counted.
        object.__setattr__(self, "_meta_head", copy.deepcopy(head).to("meta"))

    def forward(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        out, error = None, None
        for candidate in self._candidate_inputs(args):
            try:
                with torch.no_grad():
                    out = self._meta_head(*candidate)
                break
            except RuntimeError as e:
                error = e
        if out is None:
            raise UnsupportedModel(f"the dropped head of task {self.task!r} cannot stand in for its output: {error}")
        return tree_map(lambda o: torch.zeros(o.shape, dtype=o.dtype, device=device)
                        if isinstance(o, torch.Tensor) else o, out)

    def _candidate_inputs(self, args):
        def meta(dim: int | None):
            refs = iter(self.input_shapes)
            out = []
            for a in args:
                if not isinstance(a, torch.Tensor):
                    out.append(a)
                    continue
                ref = next(refs, None)
                shape = list(a.shape)
                if ref is not None and len(ref) + 1 == len(shape):
                    if dim is None:
                        shape[1:] = ref
                    else:
                        shape[dim] = ref[dim - 1 if dim > 0 else dim]
                out.append(torch.empty(shape, dtype=a.dtype, device="meta"))
            return out

        return [meta(1), meta(-1), meta(None)]

    def extra_repr(self) -> str:
        return f"task={self.task!r}"


class KeepTasks:
    """Forward hook: the model's output dict restricted to `tasks` (its other heads were dropped)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)

    def __call__(self, module: nn.Module, inputs, output):
        return {k: v for k, v in output.items() if k in self.tasks}


def keep_tasks(net: nn.Module, tasks: Sequence[str]) -> None:
    """Make `net`'s forward return only `tasks` (replacing an earlier KeepTasks hook)."""
    for key, hook in list(net._forward_hooks.items()):
        if isinstance(hook, KeepTasks):
            del net._forward_hooks[key]
    net.register_forward_hook(KeepTasks(tasks))


class TaskModel(nn.Module):
    """A user's multi-task module (`net`) as cut's engine sees a MultiTaskModel."""

    def __init__(self, net: nn.Module, config: TaskModelConfig) -> None:
        super().__init__()
        self.net = net
        self.config = config

    @property
    def task_names(self) -> list[str]:
        return self.config.task_names

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        missing = [t for t in self.task_names if not isinstance(out, Mapping) or t not in out]
        if missing:
            raise UnsupportedModel(f"{self.config.model_class}.forward did not return tasks {missing}")
        return {t: out[t] for t in self.task_names}

    def task_of_module(self, name: str) -> str | None:
        if not name.startswith("net."):
            return None
        inner = name[len("net."):]
        for task, heads in self.config.heads:
            if any(_inside(inner, h) for h in heads):
                return task
        return None

    def classifier_layers(self) -> list[nn.Module]:
        return [self.net.get_submodule(c) for c in self.config.classifiers]

    def decompose(self, tasks: Sequence[str]) -> TaskModel:
        """An independent copy that computes only `tasks` (CUT step 1), keeping the user's class and forward."""
        unknown = [t for t in tasks if t not in self.task_names]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"cannot decompose to tasks {list(tasks)}: model has {self.task_names}")
        dropped = [(t, h) for t in self.task_names if t not in tasks for h in self.config.heads_of(t)]
        shapes = _input_shapes(self.net, [h for _, h in dropped], self.config.input_shape)
        net = copy.deepcopy(self.net)
        for task, head in dropped:
            _replace_module(net, head, DroppedHead(net.get_submodule(head), task, shapes[head]))
        keep_tasks(net, tasks)
        sub = TaskModel(net, self.config.with_tasks(list(tasks)))
        sub.train(self.training)
        return sub


def _input_shapes(net: nn.Module, names: Sequence[str], input_shape: tuple[int, ...]) -> dict[str, list[tuple]]:
    """Per module name: the per-sample shapes of its tensor inputs, from one forward pass on zeros."""
    shapes: dict[str, list[tuple]] = {}
    if not names:
        return shapes
    def record(name: str, args: tuple) -> None:  # returns None: a pre-hook's return value would replace the input
        shapes.setdefault(name, [tuple(a.shape[1:]) for a in args if isinstance(a, torch.Tensor)])

    handles = [net.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: record(n, args)) for n in names]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *input_shape, device=_device_of(net)))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return shapes


def _device_of(net: nn.Module) -> torch.device:
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    (root.get_submodule(parent) if parent else root).add_module(child, new)


# ----------------------------------------------------------------------------------------------------
# Wrapping and checking a user's model

HEAD_NAME_GUESSES = ("{t}_head", "head_{t}", "heads.{t}", "{t}", "{t}head", "{t}_decoder", "decoder_{t}")


def guess_heads(net: nn.Module, tasks: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """task -> head module name, from common names (`seg_head`, `head_seg`, `heads.seg`, `seg`, ...)."""
    modules = dict(net.named_modules())
    heads = {}
    for t in tasks:
        found = [g.format(t=t) for g in HEAD_NAME_GUESSES if g.format(t=t) in modules]
        if not found:
            children = [n for n, _ in net.named_children()]
            raise UnsupportedModel(
                f"cannot guess the head of task {t!r} in {type(net).__name__} (tried "
                f"{', '.join(g.format(t=t) for g in HEAD_NAME_GUESSES)}); pass heads={{{t!r}: 'module.name'}}; "
                f"its top-level modules are {children}")
        heads[t] = (found[0],)
    return heads


def wrap(net: nn.Module, tasks: Sequence[UserTask], heads: Mapping[str, str | Sequence[str]] | None,
         input_shape: Sequence[int]) -> TaskModel:
    """`net` as a TaskModel, after checking its output and heads and finding each head's classifier.

    `tasks`: the tasks to keep, with their losses. `heads`: task -> name(s) of the submodule(s) only that
    task uses, for every task of the model (None: guessed from names for every key `net` returns); tasks
    not in `tasks` are the ones `decompose` drops. `input_shape`: one sample's shape, e.g. (3, 64, 64);
    cut traces and counts MACs with it.
    """
    if isinstance(net, TaskModel):
        raise TypeError("wrap takes the user's module, not a TaskModel")
    input_shape = tuple(int(s) for s in input_shape)
    selected = [t.name for t in tasks]
    outputs, layers_called, modules_called = _probe(net, input_shape)
    if heads is None:
        heads = guess_heads(net, list(dict.fromkeys([*outputs, *selected])))
    heads = {t: (h,) if isinstance(h, str) else tuple(h) for t, h in heads.items()}
    unknown = [t for t in selected if t not in heads]
    if unknown:
        raise UnsupportedModel(f"heads names no module for tasks {unknown}")
    missing = [t for t in heads if t not in outputs]
    if missing:
        raise UnsupportedModel(f"{type(net).__name__}.forward returned no tensor for tasks {missing} "
                               f"(keys: {list(outputs)})")
    _check_heads(net, heads)
    idle = sorted(h for hs in heads.values() for h in hs if h not in modules_called)
    if idle:
        raise UnsupportedModel(f"heads {idle} are never called by {type(net).__name__}.forward")
    given = {t.name: t for t in tasks}
    all_tasks = tuple(given.get(t, UserTask(t, "custom")) for t in heads)  # a task not kept is never scored
    config = TaskModelConfig(tasks=all_tasks, heads=tuple(heads.items()),
                             classifiers=_classifiers(heads, layers_called), input_shape=input_shape,
                             model_class=f"{type(net).__module__}.{type(net).__qualname__}")
    return TaskModel(net, config)


def unwrap(model: TaskModel) -> nn.Module:
    return model.net


def _probe(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], list[str], set[str]]:
    """One forward pass on zeros: the tensor outputs, the Conv2d / Linear layers run (in order), every module run."""
    names = {m: n for n, m in net.named_modules()}
    layers: list[str] = []
    called: set[str] = set()

    def hook(module: nn.Module, inputs, output) -> None:
        called.add(names[module])
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            layers.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, *input_shape, device=_device_of(net)))
    except Exception as e:
        raise UnsupportedModel(f"{type(net).__name__} failed on an input of shape (1, {', '.join(map(str, input_shape))}):"
                               f" {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    if not isinstance(out, Mapping):
        raise UnsupportedModel(f"{type(net).__name__}.forward must return a dict of task outputs, "
                               f"got {type(out).__name__}")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}, layers, called


def _classifiers(heads: Mapping[str, tuple[str, ...]], layers_called: list[str]) -> tuple[str, ...]:
    """Per task, the last Conv2d / Linear its head runs: its outputs are the predictions."""
    found = []
    for t, names in heads.items():
        inside = [n for n in layers_called if any(_inside(n, h) for h in names)]
        if not inside:
            raise UnsupportedModel(f"the head of task {t!r} ({', '.join(names)}) runs no Conv2d or Linear layer: "
                                   "its output width would be the trunk's, which pruning changes; end it with one")
        found.append(inside[-1])
    return tuple(found)


def _check_heads(net: nn.Module, heads: Mapping[str, tuple[str, ...]]) -> None:
    modules = dict(net.named_modules())
    every = [(t, h) for t, hs in heads.items() for h in hs]
    for t, h in every:
        if not h or h not in modules:
            raise UnsupportedModel(f"head {h!r} of task {t!r} is not a submodule of {type(net).__name__}")
    for i, (t1, h1) in enumerate(every):
        for t2, h2 in every[i + 1:]:
            if _inside(h1, h2) or _inside(h2, h1):
                raise UnsupportedModel(f"heads overlap: {h1!r} ({t1}) and {h2!r} ({t2}); a head must belong to "
                                       "one task (shared layers belong to the trunk)")


__all__ = [
    "DroppedHead",
    "KeepTasks",
    "LOSS_KINDS",
    "TaskModel",
    "TaskModelConfig",
    "UnsupportedModel",
    "UserTask",
    "guess_heads",
    "keep_tasks",
    "make_tasks",
    "unwrap",
    "wrap",
]
