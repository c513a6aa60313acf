"""Server-side recovery: before delivery, each distinct plan's compact model is distilled from the dense model.

Pruning to a budget costs accuracy that a few hundred distillation steps win back (BENCHMARKS.md); the
server can do them because it holds the dense teacher and data of its own: by default the base model's
pre-training split (named in its card), or a directory of unlabelled images (`[recovery] data = "DIR"`).
It never uses device data, and nothing of it travels: devices receive recovered weights as before.

Every distinct plan is recovered once, all together (`cut.recovery.recover_many`): the full base model is
the teacher, its pass over a batch is shared by every plan's student (a plan's tasks are a subset of the
base model's heads), and each plan's recovered weights are kept in the run directory, so a resumed run
recovers only plans it has not recovered yet.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from cut.recovery import recover_many, recovery_batches
from cut.train import _distill_loss
from protocol.records import arrays_state, state_arrays
from server.planning import BaseModel, PlanBook
from server.rundir import RunState
from server.settings import RecoverySettings


def recovery_dataset(settings: RecoverySettings, base: BaseModel):
    """The data the server recovers on: the pre-training split of the base model's card, or an image folder."""
    card = base.card
    if settings.data == "pretrain":
        from cut.data import get_dataset

        dataset = card.get("dataset")
        if not dataset:
            raise ValueError("[recovery] data = 'pretrain': the base model card names no dataset")
        kwargs = dict(card.get("dataset_kwargs", {}))
        return get_dataset(str(dataset), "train", **kwargs)
    from cut.data.images import ImageFolder

    config = base.model.config
    return ImageFolder(settings.data, str(card.get("dataset", "")), tuple(config.input_size), config.in_channels,
                       card.get("dataset_kwargs"))


def recover_plans(book: PlanBook, base: BaseModel, settings: RecoverySettings, state: RunState | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Distil every plan of `book` from the dense model; replaces each build's weights; returns the cost."""
    config = settings.config()
    report: dict[str, Any] = {"budget": config.budget(), "data": settings.data, "plans": len(book.builds),
                              "recovered": 0, "resumed": 0, "seconds": 0.0, "seconds_data": 0.0}
    if config.steps <= 0 or not book.builds:
        return report
    pending = {}
    for plan_hash, build in book.builds.items():
        kept = state.kept_recovered(plan_hash) if state is not None else None
        if kept is not None and kept.keys() == build.arrays.keys():
            book.with_weights(plan_hash, kept)
            report["resumed"] += 1
            continue
        pending[plan_hash] = book.model(plan_hash)
    if not pending:
        return report
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    batches = recovery_batches(recovery_dataset(settings, base), config, seed=settings.seed,
                               num_samples=settings.samples, labelled=settings.data == "pretrain")
    report["seconds_data"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    stats = recover_many(pending, base.model, batches, config, seed=settings.seed, progress=progress,
                         workers=settings.workers)
    report["seconds"] = round(time.perf_counter() - start, 3)
    for plan_hash, student in pending.items():
        student.eval()
        arrays = state_arrays(student)
        book.with_weights(plan_hash, arrays)
        if state is not None:
            state.keep_recovered(plan_hash, arrays)
    report["recovered"] = len(pending)
    report["distill_loss"] = {h[:12]: s.get("distill") for h, s in stats.items()}
    return report


class UpdateGate:
    """Whether a FedAvg result may replace a plan's weights: only if, on validation batches the server holds
    (its recovery data, another seed), it is no further from the dense teacher than the weights it replaces."""

    def __init__(self, base: BaseModel, settings: RecoverySettings, samples: int = 64) -> None:
        self.base = base
        config = dataclasses.replace(settings.config(), batch_size=32)
        self.batches = recovery_batches(recovery_dataset(settings, base), config, seed=settings.seed + 1,
                                        num_samples=samples, labelled=False)
        self.refused: dict[str, int] = {}

    def gap(self, book: PlanBook, plan_hash: str, arrays: dict | None = None) -> float:
        """Mean output-distillation loss of a plan's weights (or `arrays`) against the dense teacher."""
        model = book.model(plan_hash)
        if arrays is not None:
            model.load_state_dict(arrays_state(arrays))
        tasks = list(model.task_names)
        total = 0.0
        with torch.no_grad():
            for images, _ in self.batches:
                out, ref = model(images), self.base.model(images)
                total += float(sum(_distill_loss(model.config.task(t), out[t], ref[t]) for t in tasks))
        return total / max(1, len(self.batches))

    def admit(self, book: PlanBook, plan_hash: str, arrays: dict) -> bool:
        if self.gap(book, plan_hash, arrays) <= self.gap(book, plan_hash):
            return True
        self.refused[plan_hash] = self.refused.get(plan_hash, 0) + 1
        return False


__all__ = ["UpdateGate", "recover_plans", "recovery_dataset"]
