"""Pre-training, evaluation and distillation fine-tuning of multi-task models.

One loop serves all three: a batch's loss is the weighted sum of the model's task losses (plus, when a
teacher is given, a distillation term). Evaluation accumulates each task's metrics over the whole loader.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cut.metrics import delta_m
from cut.progress import progress_bar


def make_loader(dataset: Dataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling order depends only on `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, drop_last=False)


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def multitask_loss(model: nn.Module, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the task losses of the model's tasks, and each task's loss value."""
    total = 0.0
    parts = {}
    for name in outputs:
        spec = model.config.task(name)
        loss = spec.loss(outputs[name], targets[name])
        parts[name] = float(loss.detach())
        total = total + spec.loss_weight * loss
    return total, parts


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, tasks: list[str] | None = None,
             max_batches: int | None = None) -> dict[str, dict[str, float]]:
    """task -> metric name -> value over the loader (model in eval mode)."""
    tasks = tasks or list(model.task_names)
    meters = {t: model.config.task(t).make_metric() for t in tasks}
    was_training = model.training
    model.eval()
    try:
        for i, (images, targets) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            outputs = model(images)
            for t in tasks:
                meters[t].update(outputs[t], targets[t])
    finally:
        model.train(was_training)
    return {t: m.compute() for t, m in meters.items()}


def primary_metrics(model_or_config, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """task -> its primary metric value (the number delta_m is computed from)."""
    config = getattr(model_or_config, "config", model_or_config)
    return {t: metrics[t][config.task(t).primary_metric] for t in metrics}


def multitask_delta(model_or_config, compact: Mapping[str, Mapping[str, float]],
                    dense: Mapping[str, Mapping[str, float]]) -> float:
    """delta_m (EVALUATION.md) of two `evaluate()` results over the tasks of `dense`."""
    config = getattr(model_or_config, "config", model_or_config)
    directions = {t: config.task(t).higher_is_better for t in dense}
    return delta_m(primary_metrics(config, {t: compact[t] for t in dense}), primary_metrics(config, dense),
                   directions)


def pretrain(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader | None, epochs: int,
             lr: float = 2e-3, weight_decay: float = 1e-4, progress: bool = True,
             eval_max_batches: int | None = None) -> dict:
    """Multi-task training from the current weights with AdamW and a cosine schedule.

    Returns {"seconds", "epochs", "final_loss", "metrics"} where metrics are evaluated on `test_loader`.
    """
    steps = max(1, epochs * len(train_loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    model.train()
    last_parts: dict[str, float] = {}
    with progress_bar("pre-training", total=steps, enabled=progress) as advance:
        batches = _cycle(train_loader)
        for _ in range(steps):
            images, targets = next(batches)
            loss, last_parts = multitask_loss(model, model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            advance(1, " ".join(f"{k}={v:.3f}" for k, v in last_parts.items()))
    result = {"seconds": time.perf_counter() - start, "epochs": epochs, "steps": steps, "final_loss": last_parts}
    if test_loader is not None:
        result["metrics"] = evaluate(model, test_loader, max_batches=eval_max_batches)
    return result


def _distill_loss(spec, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Match the teacher's predictions: KL for class scores, L1 for regression outputs."""
    if spec.kind in ("segmentation", "classification"):
        return F.kl_div(F.log_softmax(student_out, 1), F.softmax(teacher_out, 1), reduction="batchmean") / (
            student_out[0, 0].numel())
    if spec.kind == "normals":
        return (1 - F.cosine_similarity(student_out, teacher_out, dim=1)).mean()
    return (student_out - teacher_out).abs().mean()


def finetune(student: nn.Module, teacher: nn.Module | None, loader: DataLoader, steps: int, lr: float = 1e-3,
             distill_weight: float = 0.5, feature_weight: float = 0.0, progress: bool = True) -> None:
    """Recover a compact model with K steps of task losses plus distillation from the dense teacher.

    The loss is (1 - distill_weight) * task losses + distill_weight * output distillation; with
    `feature_weight` > 0 and equal backbone output shapes, the backbone features are matched too (L2).
    K = 0 does nothing.
    """
    if steps <= 0:
        return
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    student.train()
    if teacher is not None:
        teacher.eval()
    batches = _cycle(loader)
    with progress_bar("fine-tuning", total=steps, enabled=progress) as advance:
        for _ in range(steps):
            images, targets = next(batches)
            outputs = student(images)
            task_loss, _ = multitask_loss(student, outputs, targets)
            loss = task_loss
            if teacher is not None and distill_weight > 0:
                with torch.no_grad():
                    teacher_out = teacher(images)
                distill = sum(
                    student.config.task(t).loss_weight * _distill_loss(student.config.task(t), outputs[t], teacher_out[t])
                    for t in outputs
                )
                loss = (1 - distill_weight) * task_loss + distill_weight * distill
                if feature_weight > 0:
                    loss = loss + feature_weight * _feature_loss(student, teacher, images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            advance(1, f"loss={loss.item():.3f}")


def _feature_loss(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    fs = student.backbone(images)
    with torch.no_grad():
        ft = teacher.backbone(images)
    if fs.shape != ft.shape:
        return fs.sum() * 0.0
    return F.mse_loss(fs, ft)
