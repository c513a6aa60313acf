"""cut's Python API: prune your own multi-task model, or run CUT's federated steps one at a time.

    compact, report = cut.prune(model, ["seg", "cls"], budget=0.5, data=batches,
                                heads={"seg": "seg_head", "cls": "cls_head"})
    cut.save_compact(compact, report.plan, "out/", factory="mypkg.models:build")
    compact = cut.load_compact("out/")

`model`: any nn.Module whose forward(x) returns {task: tensor}. `heads`: for every task of the model,
task -> the name(s) of the submodule(s) only that task uses (default: guessed from names such as
`seg_head`); everything else is the shared trunk, and the heads of tasks not selected are dropped. `data`: an iterable of (images, {task: target}) batches (a DataLoader or a list).
`tasks`: task names (loss from the target dtype: integer -> cross-entropy, float -> L1) or a mapping
task -> "classification" | "segmentation" | "regression" | a loss callable(pred, target).

The returned model is your class with your forward, pruned in place on a copy; heads of tasks you did not
select are replaced by parameter-free stand-ins and removed from its output (`cut.models.custom`).
Channel groups come from Torch-Pruning's DependencyGraph; cut prunes Conv2d (plain or depthwise), Linear
and BatchNorm channels, and leaves whole any width coupled with another parameterised layer (attention,
LayerNorm, GroupNorm, grouped or transposed convolutions, embeddings, bare parameters): the report lists
them (`kept_whole`). In a transformer block that leaves the feed-forward width prunable and keeps the
embedding width. MACs count Conv2d / Linear module calls only (not attention's matrix products).

The federated parts, as devices and the server run them (`server/` and `client/` do the same with
Flower around it):

    scores = cut.score(model, tasks, local_batches, heads=...)         # each device: per task, per channel
    fused  = cut.fuse([scores_a, scores_b])                           # server: across devices, then tasks
    plan   = cut.plan(model, tasks, fused, 0.5, heads=..., input_shape=(3, 64, 64))
    compact = cut.build_compact(model, plan, heads=..., input_shape=(3, 64, 64))

Not supported: inputs other than one float tensor (token ids, several inputs); forwards whose path depends
on the data (Torch-Pruning traces one pass at `input_shape`); modules shared between heads or between a
head and the trunk (give them to the trunk). Recovery of a user's model distils outputs and uses the task
losses, without the zoo backbones' attention transfer. ONNX export (`cutfl export`) is for zoo models.

Importing this module is cheap (torch is imported when a function runs), so `import cut` stays cheap.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cut.plan import PruningPlan

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from cut.models.custom import TaskModel

CARD_NAME = "compact.json"
WEIGHTS_NAME = "weights.pt"
CARD_FORMAT = "cut-fl-custom-model/1"
BUILD_ATTR = "cut_build"  # on a compact model: what save_compact needs to rebuild it (JSON-able dict)

TaskScores = dict[str, dict[str, "np.ndarray"]]  # task -> channel group -> per-channel scores


@dataclass(frozen=True)
class PruneReport:
    """What `prune` reached. `*_before` is the dense model with only the selected tasks' heads (the budget is a
    fraction of it); `params_full` the model as given, every head included."""

    tasks: tuple[str, ...]
    budget_kind: str
    budget_value: float
    params_full: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    plan: PruningPlan
    kept_whole: dict[str, str] = field(default_factory=dict)  # channel group -> why cut never prunes it
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def summary(self) -> str:
        return (f"tasks {','.join(self.tasks)}: params {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_ratio:.1%}), MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.1%}), "
                f"budget {self.budget_kind}={self.budget_value:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "budget": {"kind": self.budget_kind, "value": self.budget_value},
                "params": {"full": self.params_full, "before": self.params_before, "after": self.params_after,
                           "ratio": self.params_ratio},
                "macs": {"before": self.macs_before, "after": self.macs_after, "ratio": self.macs_ratio},
                "plan": self.plan.to_dict(), "kept_whole": dict(self.kept_whole), "seconds": dict(self.seconds)}


# ----------------------------------------------------------------------------------------------------
# One call


def prune(model: nn.Module, tasks: Sequence[str] | Mapping[str, Any], budget: float | str | tuple[str, float],
          data: Iterable, *, heads: Mapping[str, str | Sequence[str]] | None = None, criterion: str = "fisher",
          recover_steps: int = 0, num_batches: int = 4, input_shape: Sequence[int] | None = None, seed: int = 0,
          progress: bool = False) -> tuple[nn.Module, PruneReport]:
    """Prune `model` for `tasks` to `budget` with CUT; returns (compact model, report).

    The same run as `cutfl prune` (`cut.pipeline.prune`): per-task `criterion` scores on the first
    `num_batches` batches of `data`, per-task normalisation and mean fusion of shared channels, cost-aware
    planning to the budget, compaction, BatchNorm statistics re-estimated on the scoring batches, then
    `recover_steps` steps of recovery (distillation from the dense model plus the task losses) on `data`.
    `budget`: a fraction of the parameters (0.5), or "params=0.5" / "macs=0.5" / "memory=0.5" / ("macs", 0.5)
    (memory: float32 weights + peak activations of batch-1 inference, `cut.memory`).
    """
    from cut.models.custom import make_tasks, unwrap
    from cut.pipeline import prune as run_pipeline
    from cut.recovery import RecoveryConfig

    kind, value = parse_budget(budget)
    t0 = time.perf_counter()
    batches = _take_batches(data, max(num_batches, recover_steps))
    selected = make_tasks(tasks, batches[0][1])
    base = _wrap(model, selected, heads, input_shape or tuple(batches[0][0].shape[1:]))
    names = [t.name for t in selected]
    _check_targets(batches, names)
    analysis = _analyse(base.decompose(names))
    dense_shapes = _output_shapes(base)
    recovery = RecoveryConfig(steps=recover_steps, feature_weight=0.0)  # attention transfer needs a zoo backbone
    try:
        compact, plan, report = run_pipeline(base, names, kind, value, criterion=criterion,
                                             scoring_batches=batches[:num_batches], recovery=recovery,
                                             recovery_batches=batches, seed=seed, progress=progress)
    except ValueError as e:
        if "unreachable" in str(e) and analysis.kept_whole:
            raise ValueError(f"{e}; cut keeps these channel groups whole: {_kept_whole_text(analysis)}") from e
        raise
    _check_outputs(compact, dense_shapes)
    net = unwrap(compact)
    setattr(net, BUILD_ATTR, {"dense": base.config.to_dict(), "tasks": list(names)})
    seconds = {k: float(v) for k, v in report["seconds"].items()}
    seconds["total"] = time.perf_counter() - t0
    return net, PruneReport(
        tasks=tuple(names), budget_kind=kind, budget_value=float(value), params_full=report["full"]["params"],
        params_before=report["dense"]["params"], params_after=report["params"], macs_before=report["dense"]["macs"],
        macs_after=report["macs"], plan=plan, kept_whole=dict(analysis.kept_whole), seconds=seconds)


# ----------------------------------------------------------------------------------------------------
# The federated parts


def score(model: nn.Module, tasks: Sequence[str] | Mapping[str, Any], data: Iterable, *,
          heads: Mapping[str, str | Sequence[str]] | None = None, criterion: str = "fisher", num_batches: int = 4,
          input_shape: Sequence[int] | None = None, seed: int = 0) -> TaskScores:
    """Per task, one importance score per channel of every channel group that task uses (CUT step 2).

    This is what a device computes on its private data and sends instead of data or weights: the model
    is decomposed to `tasks` first, as the server would send it, and each task is scored on its own loss.
    Group names are the same in every decomposition, so scores from devices with other tasks can be fused.
    """
    from cut.importance import score_tasks
    from cut.models.custom import make_tasks

    batches = _take_batches(data, num_batches)
    selected = [t.name for t in make_tasks(tasks, batches[0][1])]
    base = _wrap(model, make_tasks(tasks, batches[0][1]), heads, input_shape or tuple(batches[0][0].shape[1:]))
    _check_targets(batches, selected)
    decomposed = base.decompose(selected)
    _analyse(decomposed)
    return score_tasks(decomposed, batches, selected, criterion, len(batches), seed)


def fuse(scores: TaskScores | Sequence[TaskScores], *, rule: str = "weighted", normalise: str = "global",
         priorities: Mapping[str, float] | None = None, weights: Sequence[float] | None = None,
         ) -> dict[str, np.ndarray]:
    """One score per channel from per-task scores (CUT step 3): the input of `plan`.

    `scores` is one task -> group -> scores mapping, or one per device: then each device's scores are
    normalised (each task's share of its total) and averaged per task over the devices that scored it
    (weighted by `weights`, e.g. samples), the server's default aggregation (robust rules are in
    server/aggregate.py). Each task's scores are then normalised (`normalise`) and shared channels fused
    (`rule`: weighted mean by task `priorities`, equal by default; also mean, max, union): the
    same functions `cut.planner.plan_from_scores` uses, so score -> fuse -> plan gives `prune`'s plan.
    """
    from cut import fusion

    per_task = _average_devices(scores, weights) if isinstance(scores, Sequence) else dict(scores)
    return fusion.fuse(per_task, rule=rule, normalisation=normalise, priorities=priorities)


def plan(model: nn.Module, tasks: Sequence[str] | Mapping[str, Any], fused: Mapping[str, np.ndarray],
         budget: float | str | tuple[str, float], *, input_shape: Sequence[int],
         heads: Mapping[str, str | Sequence[str]] | None = None, options: Any = None) -> PruningPlan:
    """The PruningPlan that keeps the best channels of `fused` within the budget (CUT step 4, no model pruned).

    Channels are ranked by fused score per parameter (or MAC) they cost, with `cut.budget.make_plan`, the
    planner of the server and of `cutfl prune`; `options` is a `cut.budget.BudgetOptions`. The plan is JSON
    (`plan.to_json()`): what the server sends a device, and what `build_compact` applies.
    """
    from cut.budget import make_plan
    from cut.models.custom import make_tasks

    kind, value = parse_budget(budget)
    selected = make_tasks(tasks)
    base = _wrap(model, selected, heads, input_shape)
    names = tuple(t.name for t in selected)
    analysis = _analyse(base.decompose(names))
    try:
        return make_plan(dict(fused), analysis, kind, value, options, tasks=names, method="cut")
    except ValueError as e:
        if "unreachable" in str(e) and analysis.kept_whole:
            raise ValueError(f"{e}; cut keeps these channel groups whole: {_kept_whole_text(analysis)}") from e
        raise


def build_compact(model: nn.Module, plan: PruningPlan, *, input_shape: Sequence[int],
                  heads: Mapping[str, str | Sequence[str]] | None = None, data: Iterable | None = None) -> nn.Module:
    """The compact model `plan` describes: a pruned copy of `model` (your class), the plan's tasks only.

    `data`: batches to re-estimate BatchNorm statistics on (pruning shifts them; `prune` does this on its
    scoring batches). Without it the dense model's statistics are kept.
    """
    from cut.compact import compact_model, recalibrate_batchnorm
    from cut.models.custom import make_tasks, unwrap

    base = _wrap(model, make_tasks(plan.tasks), heads, input_shape)
    compact = compact_model(base.decompose(list(plan.tasks)), plan)
    if data is not None:
        recalibrate_batchnorm(compact, [(b[0], None) for b in data])
    net = unwrap(compact)
    setattr(net, BUILD_ATTR, {"dense": base.config.to_dict(), "tasks": list(plan.tasks)})
    return net.eval()


# ----------------------------------------------------------------------------------------------------
# Saving and loading without pickle


def save_compact(model: nn.Module, plan: PruningPlan, directory: str | Path, *, factory: str) -> Path:
    """Write `directory`/compact.json (factory, tasks, heads, input shape, plan) and weights.pt (tensors only).

    `factory` is "module:function", a function that returns your dense model (untrained weights are fine:
    the weights file replaces them). It is checked now: the dense model it builds, decomposed and pruned
    by the plan, must have exactly `model`'s parameter names and shapes.
    """
    from cut.checkpoint import atomic_write, sha256_bytes, state_dict_bytes

    build = getattr(model, BUILD_ATTR, None)
    if build is None:
        raise ValueError("save_compact takes a model returned by cut.prune, cut.build_compact or cut.load_compact")
    card = {"format": CARD_FORMAT, "factory": factory, "dense": build["dense"], "tasks": build["tasks"],
            "plan": plan.to_dict()}
    rebuilt = _rebuild(card)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise ValueError(f"factory {factory!r} with the plan does not rebuild this model (first differences: {diff})")
    data = state_dict_bytes(model)
    card["weights_sha256"] = sha256_bytes(data)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, data)
    atomic_write(directory / CARD_NAME, json.dumps(card, indent=2, sort_keys=True).encode())
    return directory


def load_compact(directory: str | Path, *, factory: str | None = None) -> nn.Module:
    """Rebuild a saved compact model: factory() -> drop the unselected heads -> apply the plan -> load weights.

    Weights are read with `torch.load(weights_only=True)` after their sha256 is checked; no module is
    unpickled. The card names the factory to import: load only directories you trust, or pass `factory`.
    """
    import io

    import torch

    from cut.checkpoint import sha256_bytes

    directory = Path(directory)
    try:
        card = json.loads((directory / CARD_NAME).read_text())
        data = (directory / WEIGHTS_NAME).read_bytes()
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory} is not a saved compact model ({CARD_NAME} + {WEIGHTS_NAME}): {e}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{directory / CARD_NAME} is not a cut compact-model card (format {CARD_FORMAT!r})")
    if sha256_bytes(data) != card.get("weights_sha256"):
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match the sha256 in {CARD_NAME}")
    if factory is not None:
        card = {**card, "factory": factory}
    model = _rebuild(card)
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Helpers


def parse_budget(budget: float | str | tuple[str, float]) -> tuple[str, float]:
    """(kind, fraction) from 0.5, "params=0.5", "macs=0.5", "memory=0.5" or ("macs", 0.5)."""
    from cut.budget import check_budget

    if isinstance(budget, str):
        kind, sep, value = budget.partition("=")
        if not sep:
            raise ValueError(f"budget {budget!r}: write a fraction, 'params=0.5' or 'macs=0.5'")
        try:
            budget = (kind.strip(), float(value))
        except ValueError:
            hint = ("; a memory budget here is a fraction of the dense model's memory (for a size such as 3MB "
                    "use cut.memory.memory_fraction, or `cutfl prune --budget memory=3MB`)"
                    if kind.strip() == "memory" else "")
            raise ValueError(f"budget {budget!r}: {value!r} is not a number{hint}") from None
    kind, value = budget if isinstance(budget, tuple) else ("params", budget)
    check_budget(kind, value)
    return kind, float(value)


def resolve_factory(factory: str):
    """The callable named by "module:function"."""
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory {factory!r} must be 'module:function'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"factory {factory!r}: cannot import {module_name!r} ({e})") from None
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ValueError(f"factory {factory!r}: {attr!r} is not a callable of {module_name!r}")
    return target


def _rebuild(card: Mapping[str, Any]) -> nn.Module:
    """factory() -> TaskModel -> decompose to the card's tasks -> apply the plan; the user's module, no weights."""
    from cut.compact import PlanMismatch, apply_plan
    from cut.models.custom import UserTask, unwrap

    dense = card["dense"]
    net = resolve_factory(card["factory"])()
    tasks = [UserTask(t["name"], t["kind"], loss_weight=t.get("loss_weight", 1.0)) for t in dense["tasks"]]
    base = _wrap(net, tasks, {t: tuple(h) for t, h in dense["heads"]}, dense["input_shape"])
    if list(base.config.classifiers) != list(dense["classifiers"]):
        raise ValueError(f"factory {card['factory']!r} builds another model: classifiers "
                         f"{list(base.config.classifiers)} instead of {dense['classifiers']}")
    try:
        compact = apply_plan(base.decompose(list(card["tasks"])), PruningPlan.from_dict(card["plan"]))
    except PlanMismatch as e:
        text = str(e) if len(str(e)) < 300 else str(e)[:300] + "..."
        raise ValueError(f"factory {card['factory']!r} builds another model: {text}") from None
    model = unwrap(compact)
    setattr(model, BUILD_ATTR, {"dense": dict(dense), "tasks": list(card["tasks"])})
    return model


def _wrap(model, tasks, heads, input_shape) -> TaskModel:
    from cut.models.custom import TaskModel, wrap

    if isinstance(model, TaskModel):
        return model
    if input_shape is None:
        raise ValueError("input_shape (one sample, e.g. (3, 64, 64)) is needed to trace the model")
    return wrap(model, tasks, heads, input_shape)


def _analyse(model: TaskModel):
    """Channel groups of a wrapped model; a model Torch-Pruning cannot trace fails with one clear message."""
    from cut.groups import analyse
    from cut.models.custom import UnsupportedModel

    try:
        analysis = analyse(model)
    except NotImplementedError as e:
        raise UnsupportedModel(str(e)) from e
    except Exception as e:
        raise UnsupportedModel(f"Torch-Pruning could not trace {model.config.model_class}: "
                               f"{type(e).__name__}: {e}") from e
    if not analysis.groups:
        why = f" (kept whole: {_kept_whole_text(analysis)})" if analysis.kept_whole else ""
        raise UnsupportedModel(f"{model.config.model_class} has no channel group cut can prune{why}")
    return analysis


def _kept_whole_text(analysis) -> str:
    return "; ".join(f"{g} ({why})" for g, why in analysis.kept_whole.items())


def _take_batches(data: Iterable, n: int) -> list:
    batches = list(islice(iter(data), max(1, n)))
    if not batches:
        raise ValueError("data yielded no batch")
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], Mapping)):
            raise ValueError("data must yield (images, {task: target}) batches")
    return batches


def _check_targets(batches: list, tasks: Sequence[str]) -> None:
    missing = sorted({t for _, targets in batches for t in tasks if targets.get(t) is None})
    if missing:
        raise ValueError(f"data has no targets for tasks {missing}")


def _output_shapes(model: TaskModel) -> dict[str, tuple[int, ...]]:
    import torch

    from cut.groups import example_input

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {t: tuple(v.shape) for t, v in model(example_input(model)).items()}
    finally:
        model.train(was)


def _check_outputs(compact: TaskModel, dense: Mapping[str, tuple[int, ...]]) -> None:
    from cut.models.custom import UnsupportedModel

    got = _output_shapes(compact)
    wrong = {t: (dense[t], got.get(t)) for t in got if got[t] != dense[t]}
    if wrong:
        raise UnsupportedModel(f"pruning changed the output shapes {wrong}: a head's last layer was not found; "
                               "give each head a final Conv2d or Linear")


def _average_devices(reports: Sequence[TaskScores], weights: Sequence[float] | None) -> TaskScores:
    """Per (task, group): the weighted mean of the devices' `global`-normalised vectors (server/aggregate.py's
    default rule with one weight per device)."""
    import numpy as np

    from cut import fusion

    if not reports:
        raise ValueError("fuse needs at least one score report")
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(reports)
    if len(weights) != len(reports) or any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"fuse needs one finite weight >= 0 per score report ({len(weights)} for {len(reports)})")
    collected: dict[str, dict[str, tuple[list, list]]] = {}
    for report, w in zip(reports, weights, strict=True):
        for task, groups in fusion.normalise(dict(report), "global").items():
            for g, v in groups.items():
                vectors, ws = collected.setdefault(task, {}).setdefault(g, ([], []))
                vectors.append(np.asarray(v, dtype=np.float64))
                ws.append(w)
    out: TaskScores = {}
    for task, groups in collected.items():
        out[task] = {}
        for g, (vectors, ws) in groups.items():
            stack, w = np.stack(vectors), np.asarray(ws)
            mean = (w[:, None] * stack).sum(0) / w.sum() if w.sum() > 0 else stack.mean(0)
            out[task][g] = mean.astype(np.float32)
    return out


__all__ = [
    "PruneReport",
    "build_compact",
    "fuse",
    "load_compact",
    "parse_budget",
    "plan",
    "prune",
    "save_compact",
    "score",
]
