"""One CUT pruning run, top to bottom: decompose, score, fuse, plan, compact, recover, evaluate.

    decomposed = base.decompose(tasks)                       # step 1: keep the selected heads
    plan       = methods.plan_with(method, request)          # steps 2-3 + budget: scores -> fused -> plan
    compact    = compact.compact_model(decomposed, plan)     # step 4: physically smaller dense model
    recover(compact, teacher=decomposed, batches, config)    # optional recovery, the same for every method

The report says what was reached (params, MACs, bytes; each as a ratio to the dense decomposed model and
to the full multi-task model), what decomposition alone saved, per-task metrics before (dense decomposed)
and after, delta_m (EVALUATION.md), and where the time went. Data loading is timed apart from pruning.

Same data for every method: `Samples` materialises a split once as tensors, and `seed_data` draws from
it, per seed, the scoring batches (also used to re-estimate BatchNorm statistics) and the recovery
batches (`IndexedBatches`, built on access from a fixed index order, so every method trains on
byte-identical batches without holding them all in memory).

Recovery is one stage for every method (`recover`, configured by a `RecoveryConfig`); its budget
(steps x batch size, learning rate, schedule, distillation) is reported with every result.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from cut.budget import BudgetOptions, check_budget
from cut.checkpoint import state_dict_bytes
from cut.compact import compact_model, recalibrate_batchnorm
from cut.importance import Batch
from cut.methods import PlanRequest, canonical, plan_with
from cut.models import MultiTaskModel, count_macs, count_params
from cut.plan import PruningPlan
from cut.progress import progress_bar
from cut.train import evaluate, finetune, make_loader, multitask_delta

# ----------------------------------------------------------------------------------------------------
# Recovery: one function for every method. Until cut/recovery.py lands, an adapter over
# cut.train.finetune with the same API; switching is the import line below.


@dataclass(frozen=True)
class RecoveryConfig:
    """Recovery budget and recipe (fields as cut.recovery.RecoveryConfig)."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_fraction: float = 0.0
    distill_weight: float = 0.5
    feature_weight: float = 0.0
    weight_decay: float = 0.0

    def budget(self) -> str:
        if self.steps <= 0:
            return "no recovery"
        return (f"{self.steps} steps x batch {self.batch_size} ({self.steps * self.batch_size} samples), AdamW lr "
                f"{self.lr:g}, cosine, distillation weight {self.distill_weight:g}")


def recover(student: torch.nn.Module, teacher: torch.nn.Module | None, batches: Iterable[Batch],
            config: RecoveryConfig, *, seed: int = 0, progress: bool = False) -> dict:
    """Train `student` for config.steps steps on `batches` (cycled), distilling from `teacher`."""
    torch.manual_seed(seed)
    t = time.perf_counter()
    finetune(student, teacher, batches, config.steps, lr=config.lr, distill_weight=config.distill_weight,
             feature_weight=config.feature_weight, progress=progress)
    return {"steps": config.steps, "seconds": time.perf_counter() - t}


# ----------------------------------------------------------------------------------------------------
# Same data for every method


@dataclass
class Samples:
    """A split materialised as tensors: images (N, C, H, W) and task -> targets (N, ...)."""

    images: torch.Tensor
    targets: dict[str, torch.Tensor]

    @classmethod
    def from_dataset(cls, dataset: Dataset, batch_size: int = 64) -> Samples:
        images, targets = [], {}
        for x, y in make_loader(dataset, batch_size):
            images.append(x)
            for k, v in y.items():
                targets.setdefault(k, []).append(v)
        return cls(torch.cat(images), {k: torch.cat(v) for k, v in targets.items()})

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: torch.Tensor) -> Batch:
        return self.images[idx], {k: v[idx] for k, v in self.targets.items()}

    def batches(self, batch_size: int) -> list[Batch]:
        """The split in order, in batches of `batch_size` (the evaluation set)."""
        n = len(self)
        return [self.batch(torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


class IndexedBatches(Sequence):
    """Batch i = samples at order[i * batch_size : (i + 1) * batch_size], built on access."""

    def __init__(self, samples: Samples, order: torch.Tensor, batch_size: int) -> None:
        self.samples, self.order, self.batch_size = samples, order, batch_size

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.samples.batch(self.order[i * self.batch_size:(i + 1) * self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))


def _order(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` sample indices: successive random permutations of range(n) (epochs), concatenated."""
    parts, total = [], 0
    while total < count:
        parts.append(torch.randperm(n, generator=generator))
        total += n
    return torch.cat(parts)[:count] if parts else torch.zeros(0, dtype=torch.long)


@dataclass
class SeedData:
    """One seed's data, shared by every method and budget of that seed."""

    seed: int
    scoring: list[Batch]  # scoring and BatchNorm re-estimation
    recovery: IndexedBatches  # recovery steps, in order


def seed_data(train: Samples, seed: int, batch_size: int, num_batches: int, recovery: RecoveryConfig) -> SeedData:
    """The scoring batches (one permutation of the train samples) and the recovery batches (further
    permutations), all drawn from a generator seeded by `seed` alone."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    first = torch.randperm(n, generator=gen)
    scoring = [train.batch(first[i:i + batch_size]) for i in range(0, min(n, num_batches * batch_size), batch_size)]
    order = _order(n, max(recovery.steps, 0) * recovery.batch_size, gen)
    return SeedData(seed, scoring, IndexedBatches(train, order, recovery.batch_size))


# ----------------------------------------------------------------------------------------------------
# One run


def model_size(model: MultiTaskModel) -> dict[str, int]:
    """Parameters, MACs (one image at the config's input size) and serialised state_dict bytes."""
    return {"params": count_params(model), "macs": count_macs(model), "bytes": len(state_dict_bytes(model))}


def prune(
    base_model: MultiTaskModel,
    tasks: list[str],
    budget_kind: str,
    budget_value: float,
    method: str = "cut",
    criterion: str | None = None,
    fusion: str | None = None,
    train_loader: Iterable | None = None,
    test_loader: Iterable | None = None,
    num_batches: int = 4,
    finetune_steps: int = 0,
    seed: int = 0,
    base_sha256: str = "",
    *,
    options: BudgetOptions | None = None,
    priorities: Mapping[str, float] | None = None,
    normalise: str | None = None,
    eval_batches: int | None = None,
    dense_metrics: Mapping[str, Mapping[str, float]] | None = None,
    finetune_lr: float = 1e-3,
    recalibrate_bn: bool = True,
    recovery: RecoveryConfig | None = None,
    scoring_batches: list[Batch] | None = None,
    recovery_batches: Iterable[Batch] | None = None,
    progress: bool = True,
) -> tuple[MultiTaskModel, PruningPlan, dict[str, Any]]:
    """Prune `base_model` for `tasks` to the budget; returns (compact model, plan, report).

    Data: `scoring_batches` (else the first `num_batches` of `train_loader`) score the channels and
    re-estimate BatchNorm statistics (`recalibrate_bn`: pruning shifts the statistics downstream layers
    normalise with); `recovery_batches` (else `train_loader`, cycled) feed the recovery stage. Recovery:
    `recovery` (else `finetune_steps` steps at `finetune_lr`), distilled from the dense decomposed model.
    `dense_metrics` (the decomposed model's metrics on `test_loader`) may be passed to skip evaluating
    the dense model again when several methods share one base model.
    """
    check_budget(budget_kind, budget_value)
    method = canonical(method)
    recovery = recovery or RecoveryConfig(steps=finetune_steps, lr=finetune_lr)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    decomposed = base_model.decompose(list(tasks))
    decomposed.eval()
    seconds["decompose"] = time.perf_counter() - t

    t = time.perf_counter()
    batches = list(scoring_batches) if scoring_batches is not None else _take(train_loader, num_batches)
    seconds["data"] = time.perf_counter() - t

    with progress_bar(f"pruning ({method})", total=3, enabled=progress) as advance:
        request = PlanRequest(
            model=decomposed, batches=batches, tasks=tuple(tasks), budget_kind=budget_kind,
            budget_value=float(budget_value), options=options or BudgetOptions(), seed=seed,
            base_model_sha256=base_sha256, priorities=dict(priorities or {}),
        )
        result = plan_with(method, request, criterion=criterion, fusion_rule=fusion, normalise=normalise)
        seconds.update(result.seconds)
        advance(1, "planned")
        t = time.perf_counter()
        compact = compact_model(decomposed, result.plan)
        seconds["compaction"] = time.perf_counter() - t
        seconds["prune_total"] = sum(seconds[k] for k in ("scoring", "fusion", "planning", "compaction"))
        t = time.perf_counter()
        if recalibrate_bn and batches:
            recalibrate_batchnorm(compact, batches)
        seconds["bn_recalibration"] = time.perf_counter() - t
        advance(1, "compacted")

        t = time.perf_counter()
        metrics: dict[str, Any] = {}
        if test_loader is not None:
            metrics["dense"] = dense_metrics or evaluate(decomposed, test_loader, list(tasks), eval_batches)
            if recovery.steps > 0:
                metrics["compact_before_recovery"] = evaluate(compact, test_loader, list(tasks), eval_batches)
        seconds["evaluate"] = time.perf_counter() - t
        advance(1, "evaluated dense")

    t = time.perf_counter()
    if recovery.steps > 0:
        data = recovery_batches if recovery_batches is not None else train_loader
        if data is None:
            raise ValueError("recovery needs recovery_batches or a train_loader")
        recover(compact, decomposed, data, recovery, seed=seed, progress=progress)
    compact.eval()
    seconds["recovery"] = time.perf_counter() - t

    t = time.perf_counter()
    if test_loader is not None:
        metrics["compact"] = evaluate(compact, test_loader, list(tasks), eval_batches)
    seconds["evaluate"] += time.perf_counter() - t

    report = _report(base_model, decomposed, compact, result, metrics, seconds)
    report.update({"tasks": list(tasks), "method": method, "seed": seed, "num_batches": len(batches),
                   "bn_recalibrated": bool(recalibrate_bn and batches),
                   "recovery": {**asdict(recovery), "budget": recovery.budget()},
                   "budget": {"kind": budget_kind, "value": float(budget_value)}})
    return compact, result.plan, report


def _take(loader: Iterable | None, n: int) -> list:
    if loader is None:
        return []
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def _report(base, decomposed, compact, result, metrics, seconds) -> dict[str, Any]:
    full, dense, small = model_size(base), model_size(decomposed), model_size(compact)
    report: dict[str, Any] = {
        **small,
        "dense": dense,
        "full": full,
        "params_ratio": small["params"] / dense["params"],
        "macs_ratio": small["macs"] / dense["macs"],
        "bytes_ratio": small["bytes"] / dense["bytes"],
        "params_ratio_full": small["params"] / full["params"],
        "macs_ratio_full": small["macs"] / full["macs"],
        "bytes_ratio_full": small["bytes"] / full["bytes"],
        "decomposition": {
            "params_ratio": dense["params"] / full["params"],
            "macs_ratio": dense["macs"] / full["macs"],
            "bytes_ratio": dense["bytes"] / full["bytes"],
        },
        "plan_hash": result.plan.plan_hash,
        "plan_achieved": dict(result.plan.achieved),
        "method_info": dict(result.info),
        "metrics": metrics,
        "seconds": seconds,
    }
    if "dense" in metrics and "compact" in metrics:
        report["delta_m"] = multitask_delta(compact, metrics["compact"], metrics["dense"])
        before = metrics.get("compact_before_recovery", metrics["compact"])
        report["delta_m_before_recovery"] = multitask_delta(compact, before, metrics["dense"])
    return report


__all__ = [
    "IndexedBatches",
    "RecoveryConfig",
    "Samples",
    "SeedData",
    "model_size",
    "prune",
    "recover",
    "seed_data",
]
