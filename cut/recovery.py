"""Recovery: distil compact models back towards the dense model they were cut from.

One recipe serves the engine benchmark (every method gets the same recovery, so it must be a fixed budget
of steps x batch over byte-identical batches) and the federation server (each distinct compact model is
distilled from the dense decomposed model before delivery, on data the server holds, often unlabelled).

The loss of a student on a batch is

    (1 - distill_weight) * task losses + distill_weight * output distillation + feature_weight * attention

where the task losses use whatever labels the batch has (none: pure distillation), output distillation is
`cut.train._distill_loss` per task (KL for classes, cosine for normals, L1 for depth), and attention is
attention transfer (Zagoruyko & Komodakis 2017) at the backbone's stage outputs: the normalised map of
channel-mean squared activations, which does not depend on how many channels pruning left.

`recover_many` trains several students cut from one teacher: the teacher pass of each batch is computed
once (and kept while it fits `TEACHER_CACHE_BYTES`), and every student reads the outputs of its own tasks.
The teacher may be the full multi-task model: `decompose` keeps its backbone and heads, so its outputs for
a task subset are the decomposed model's. Students step in a fixed order on the same batches, so
`recover_many` gives bit-for-bit what `recover` gives per student.

Defaults, measured with benchmarks/bench_recovery.py (scenes model, method cut, params budgets 0.3/0.5/0.7,
seg+depth and seg+depth+normals; raw numbers in benchmarks/results/recovery.json):
- lr 1e-3 with 10% warm-up then cosine: 3e-3 moved the weights too far (0.7 budget ended worse than at 1e-3
  by ~1 point), 3e-4 was too slow at 0.3; no warm-up cost 0.1-0.6 points.
- distill_weight 0.5: with labels, adding the task loss gained 0.3-0.9 points over pure distillation.
- feature_weight 10: attention transfer gained 0.1-0.4 points with pure distillation (the unlabelled case),
  about 0.1 at 0.5/0.7 with labels, and never cost more than noise. Weight 1 was too weak, 30 no better.
- 200 steps x 32: most of the gain of 300 at two thirds of the cost (~0.1-0.2 CPU s a step and model on
  one core); 100 steps left 1-2 points more at budget 0.3.
- BatchNorm trains in train mode: freezing it (freeze_bn) was 1-3 points worse. Outputs are matched at full
  resolution: head_resolution saves ~25% of the time but lost ~1.5 points where normals are a task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cut.models import MultiTaskModel
from cut.progress import progress_bar
from cut.train import _distill_loss

Batch = Any  # (images, targets) with targets a dict task -> tensor, or None/{} for unlabelled; or images alone

# Teacher outputs are kept per batch (so the teacher runs once per distinct batch over the whole recovery) up
# to this many bytes; past it the teacher is re-run each time the cycle comes back to a batch.
TEACHER_CACHE_BYTES = 768 * 2**20


@dataclass(frozen=True)
class RecoveryConfig:
    """A recovery budget and recipe; the same config gives every pruning method the same recovery."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    warmup_fraction: float = 0.1  # linear warm-up then cosine decay to 0
    distill_weight: float = 0.5  # output distillation vs task loss (1.0 = pure distillation; no labels: 1.0)
    feature_weight: float = 10.0  # attention transfer at the backbone stages
    weight_decay: float = 0.0
    freeze_bn: bool = False  # BatchNorm in eval mode while training: the student trains as it will be deployed
    head_resolution: bool = False  # distil the heads' outputs before upsampling to the input size (cheaper)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr < 0:
            raise ValueError(f"recovery needs steps >= 0, batch_size >= 1, lr >= 0: {self}")
        if not 0.0 <= self.warmup_fraction <= 1.0 or not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"warmup_fraction and distill_weight must lie in [0, 1]: {self}")

    def budget(self) -> str:
        """The budget as tables print it."""
        return f"{self.steps} steps x {self.batch_size}"

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step `step` (0-based): linear warm-up to `lr` at step `warmup`, then cosine
        decay towards 0 (no step is wasted at lr 0)."""
        warmup = int(round(self.warmup_fraction * self.steps))
        if step < warmup:
            return self.lr * (step + 1) / (warmup + 1)
        decay = max(1, self.steps - warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay))


def recovery_batches(dataset: Dataset, config: RecoveryConfig, *, seed: int = 0, num_samples: int | None = None,
                     labelled: bool = True) -> list[tuple[torch.Tensor, dict[str, torch.Tensor] | None]]:
    """A fixed list of batches of `config.batch_size` from a seeded sample of `dataset` (unlabelled: targets None).

    Materialised once so that every method (or student) trains on byte-identical data. By default the sample
    is as large as the budget needs (steps x batch_size), capped by the dataset.
    """
    n = min(len(dataset), num_samples or max(1, config.steps * config.batch_size))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    batches = []
    for start in range(0, n, config.batch_size):
        items = [dataset[i] for i in order[start:start + config.batch_size]]
        images = torch.stack([x for x, _ in items])
        targets = {t: torch.stack([y[t] for _, y in items]) for t in items[0][1]} if labelled else None
        batches.append((images, targets))
    return batches


def recover(student: MultiTaskModel, teacher: MultiTaskModel, batches: Sequence[Batch], config: RecoveryConfig,
            *, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Recover one student in place; returns {"seconds", "cpu_seconds", "steps", "loss", "distill", "task", "feature",
    "lr", "teacher_passes"}."""
    return recover_many({"student": student}, teacher, batches, config, seed=seed, progress=progress)["student"]


def recover_many(students: Mapping[str, MultiTaskModel], teacher: MultiTaskModel, batches: Sequence[Batch],
                 config: RecoveryConfig, *, seed: int = 0, progress: bool = False,
                 workers: int = 1) -> dict[str, dict[str, Any]]:
    """Recover several students of one teacher in place, sharing each batch's teacher pass; name -> stats.

    The batches are visited in a seeded order, reshuffled at each pass over the list. Stats give the mean
    losses over the last 10% of steps (at least one) and each step's learning rate. `workers` > 1 steps that
    many students at once, each on one thread (torch's thread count is set to 1 meanwhile): these models are
    too small for two threads to share one convolution well, so students side by side use the cores better
    (BENCHMARKS.md, "Threads"). Each student's arithmetic is then single-threaded, whatever `workers` is.
    """
    for name, s in students.items():
        missing = [t for t in s.task_names if t not in teacher.task_names]
        if missing:
            raise ValueError(f"student {name!r} has tasks {missing} the teacher lacks ({teacher.task_names})")
    stats = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "steps": config.steps, "loss": None, "distill": None, "task": None,
                    "feature": None, "lr": []} for name in students}
    if config.steps <= 0 or not students:
        return stats
    if not batches:
        raise ValueError("recovery needs at least one batch")
    stages = _stage_names(teacher) if config.feature_weight > 0 else []
    teacher_was_training = teacher.training
    teacher.eval()
    runs = {name: _StudentRun(s, config, stages) for name, s in students.items()}
    cache = _TeacherCache(teacher, stages, config.head_resolution)
    order = _visit_order(len(batches), config.steps, seed)
    tail = max(1, config.steps // 10)
    workers = max(1, min(workers, len(runs)))
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    threads = torch.get_num_threads()
    if pool is not None:  # one thread a student: this thread's CPU time is then the student's
        torch.set_num_threads(1)
    cpu_clock = time.thread_time if pool is not None else time.process_time

    def step_one(name: str, images, targets, teacher_out, teacher_maps, lr: float) -> dict[str, float]:
        t, cpu = time.perf_counter(), cpu_clock()
        parts = runs[name].step(images, targets, teacher_out, teacher_maps, lr)
        stats[name]["seconds"] += time.perf_counter() - t
        stats[name]["cpu_seconds"] += cpu_clock() - cpu
        return parts

    try:
        with progress_bar(f"recovery ({len(students)} model(s))", total=config.steps, enabled=progress) as advance:
            for step, index in enumerate(order):
                images, targets = _split(batches[index])
                teacher_out, teacher_maps = cache.get(index, images)
                lr = config.lr_at(step)
                args = (images, targets, teacher_out, teacher_maps, lr)
                if pool is None:
                    results = [step_one(name, *args) for name in runs]
                else:
                    results = list(pool.map(step_one, runs, *([a] * len(runs) for a in args)))
                for name, parts in zip(runs, results, strict=True):
                    s = stats[name]
                    s["lr"].append(lr)
                    if step >= config.steps - tail:
                        for k, v in parts.items():
                            s[k] = (s[k] or 0.0) + v / tail
                advance(1, f"lr={lr:.2e}")
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)
        for run in runs.values():
            run.close()
        teacher.train(teacher_was_training)
    # The teacher's time is shared: spread it evenly so per-student seconds add up to the wall time. CPU
    # seconds (all threads of this process) estimate the wall time of an idle machine when others share it.
    for s in stats.values():
        s["seconds"] += cache.seconds / len(students)
        s["cpu_seconds"] += cache.cpu_seconds / len(students)
        s["teacher_passes"] = cache.passes
    return stats


def _visit_order(num_batches: int, steps: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(num_batches, generator=generator).tolist()
    return order[:steps]


def _split(batch: Batch) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return batch, {}
    images, targets = batch[0], (batch[1] if len(batch) > 1 else None)
    return images, (targets or {})


def _stage_names(model: MultiTaskModel) -> list[str]:
    """Module names whose outputs are the backbone's stages: ResNet layer1-4, or each MobileNetV2 stage's last block.

    Names, not modules, because a compact model made by pruning a copy keeps every module's name.
    """
    backbone = model.backbone
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        return [f"backbone.layer{i}" for i in range(1, 5)]
    if hasattr(backbone, "features"):
        shapes: dict[int, tuple[int, ...]] = {}
        blocks = list(backbone.features)
        handles = [b.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, tuple(o.shape[1:])))
                   for k, b in enumerate(blocks)]
        try:
            with torch.no_grad():
                was = backbone.training
                backbone.eval()
                backbone(torch.zeros(1, model.config.in_channels, *model.config.input_size))
                backbone.train(was)
        finally:
            for h in handles:
                h.remove()
        ends = [k for k in range(len(blocks)) if k == len(blocks) - 1 or shapes[k] != shapes[k + 1]]
        return [f"backbone.features.{k}" for k in ends]
    return ["backbone"]


def _head_names(model: MultiTaskModel) -> list[str]:
    return [f"heads.{t}" for t in model.task_names]


def _attention(features: torch.Tensor) -> torch.Tensor:
    """Attention map: channel-mean of squared activations, flattened and L2-normalised per sample."""
    return F.normalize(features.pow(2).mean(1).flatten(1), dim=1)


def _attention_loss(student_maps: Mapping[str, torch.Tensor], teacher_maps: Mapping[str, torch.Tensor],
                    ) -> torch.Tensor:
    """Mean over stages of the squared distance between normalised attention maps (0 to 4 per stage)."""
    losses = [(s - teacher_maps[n]).pow(2).sum(1).mean() for n, s in student_maps.items()
              if n in teacher_maps and s.shape == teacher_maps[n].shape]
    return torch.stack(losses).mean() if losses else torch.zeros(())


class _Hooks:
    """Collects the outputs of named modules during a forward pass."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: self.outputs.__setitem__(n, o))
                        for n in names if n in modules]

    def take(self) -> dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _TeacherCache:
    """The teacher's outputs and stage attention maps per batch index, computed once while they fit."""

    def __init__(self, teacher: MultiTaskModel, stages: list[str], head_resolution: bool) -> None:
        self.teacher, self.stages, self.head_resolution = teacher, stages, head_resolution
        self.kept: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.bytes = 0
        self.seconds = self.cpu_seconds = 0.0
        self.passes = 0

    @torch.no_grad()
    def get(self, index: int, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if index in self.kept:
            return self.kept[index]
        t, cpu = time.perf_counter(), time.process_time()
        hooks = _Hooks(self.teacher, self.stages + (_head_names(self.teacher) if self.head_resolution else []))
        try:
            outputs = self.teacher(images)
            captured = hooks.take()
        finally:
            hooks.close()
        maps = {n: _attention(captured[n]) for n in self.stages}
        if self.head_resolution:
            outputs = {t: captured[f"heads.{t}"] for t in outputs}
        self.passes += 1
        size = sum(v.numel() * v.element_size() for v in [*outputs.values(), *maps.values()])
        if self.bytes + size <= TEACHER_CACHE_BYTES:
            self.kept[index] = (outputs, maps)
            self.bytes += size
        self.seconds += time.perf_counter() - t
        self.cpu_seconds += time.process_time() - cpu
        return outputs, maps


class _StudentRun:
    """One student's optimiser and loss; `step` does one update at the given learning rate."""

    def __init__(self, student: MultiTaskModel, config: RecoveryConfig, stages: list[str]) -> None:
        self.student, self.config = student, config
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.stages = stages
        names = stages + (_head_names(student) if config.head_resolution else [])
        self.hooks = _Hooks(student, names) if names else None
        student.train()
        if config.freeze_bn:
            for m in student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def step(self, images: torch.Tensor, targets: Mapping[str, torch.Tensor], teacher_out: Mapping[str, torch.Tensor],
             teacher_maps: Mapping[str, torch.Tensor], lr: float) -> dict[str, float]:
        student, config = self.student, self.config
        outputs = student(images)
        captured = self.hooks.take() if self.hooks is not None else {}
        matched = {t: captured[f"heads.{t}"] for t in outputs} if config.head_resolution else outputs
        distill = sum(student.config.task(t).loss_weight * _distill_loss(student.config.task(t), matched[t],
                                                                           teacher_out[t]) for t in outputs)
        labelled = [t for t in outputs if targets.get(t) is not None]
        parts = {"distill": float(distill.detach())}
        if labelled and config.distill_weight < 1.0:
            task = sum(student.config.task(t).loss_weight * student.config.task(t).loss(outputs[t], targets[t])
                       for t in labelled)
            loss = (1.0 - config.distill_weight) * task + config.distill_weight * distill
            parts["task"] = float(task.detach())
        else:
            loss = distill
        if self.stages:
            feature = _attention_loss({n: _attention(captured[n]) for n in self.stages if n in captured}, teacher_maps)
            loss = loss + config.feature_weight * feature
            parts["feature"] = float(feature.detach())
        parts["loss"] = float(loss.detach())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return parts

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
        self.student.eval()


__all__ = ["TEACHER_CACHE_BYTES", "RecoveryConfig", "recover", "recover_many", "recovery_batches"]
