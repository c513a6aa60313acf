"""Pre-training, evaluation and distillation fine-tuning of multi-task models.

One loop serves all three: a batch's loss is the weighted sum of the model's task losses (plus, when a
teacher is given, a distillation term). Evaluation accumulates each task's metrics over the whole loader.
`pretrain_model` is the whole pre-training job (preset, data, model, training, model directory) that
`cutfl pretrain` and the simulation runner both call.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

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
    if spec.kind == "normals":  # sums of squares: `cosine_similarity` is ~10x slower on CPU (11% of a recovery step)
        dot = (student_out * teacher_out).sum(1)
        norms = (student_out.pow(2).sum(1) * teacher_out.pow(2).sum(1)).clamp_min(1e-16).sqrt()
        return (1 - dot / norms).mean()
    return (student_out - teacher_out).abs().mean()


def finetune(student: nn.Module, teacher: nn.Module | None, loader: DataLoader, steps: int, lr: float = 1e-3,
             distill_weight: float = 0.5, feature_weight: float = 0.0, progress: bool = True,
             freeze_bn_stats: bool = False) -> None:
    """Recover a compact model with K steps of task losses plus distillation from the dense teacher.

    The loss is (1 - distill_weight) * task losses + distill_weight * output distillation; with
    `feature_weight` > 0 and equal backbone output shapes, the backbone features are matched too (L2).
    `freeze_bn_stats` keeps BatchNorm layers in eval mode (their running statistics untouched, their affine
    parameters still trained): what a device with a few dozen non-IID samples needs, since batches of 16
    from it would overwrite statistics estimated on hundreds of samples. K = 0 does nothing.
    """
    if steps <= 0:
        return
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    student.train()
    if freeze_bn_stats:
        for module in student.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.eval()
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


# Default model and training recipe per dataset: small enough for a 2-core CPU.
PRESETS: dict[str, dict] = {
    "scenes": {"backbone": "resnet18", "width": 0.25, "epochs": 8, "batch_size": 32, "lr": 3e-3,
               "train_samples": 4000, "test_samples": 400, "size": 64},
    "multifashion": {"backbone": "resnet18", "width": 0.25, "epochs": 4, "batch_size": 64, "lr": 3e-3,
                     "train_samples": 20000, "test_samples": 2000, "size": 36, "stem_pool": False},
}
GENERIC_PRESET = {"backbone": "resnet18", "width": 0.5, "epochs": 10, "batch_size": 8, "lr": 1e-3,
                  "train_samples": None, "test_samples": None, "size": None}


def preset_for(dataset: str, **overrides: Any) -> dict:
    """The dataset's preset recipe with the given (non-None) overrides."""
    preset = {**PRESETS.get(dataset, GENERIC_PRESET)}
    preset.update({k: v for k, v in overrides.items() if v is not None})
    return preset


def dataset_kwargs(dataset: str, split: str, preset: Mapping[str, Any], data_dir: str | None = None,
                   num_samples: int | None = None) -> dict:
    """Builder kwargs of `dataset`'s `split` as pre-training uses them (also recorded in the model card)."""
    kwargs: dict = {}
    if data_dir:
        kwargs["data_dir"] = data_dir
    samples = num_samples or preset.get(f"{split}_samples")
    if samples:
        kwargs["num_samples"] = samples
    if dataset in ("scenes", "multifashion") and preset.get("size"):
        kwargs["size"] = preset["size"]
    if dataset == "scenes":
        # The card records the generator seed it was trained on, so a federation can give devices
        # scenes from another seed (simulations/scenario.py) instead of the pre-training scenes.
        kwargs["seed"] = 0
    return kwargs


def pretrain_model(dataset: str, out: str | Path, *, data_dir: str | None = None, backbone: str | None = None,
                   width: float | None = None, epochs: int | None = None, batch_size: int | None = None,
                   lr: float | None = None, train_samples: int | None = None, test_samples: int | None = None,
                   seed: int = 0, imagenet: bool = False, imagenet_weights: str | Path | None = None,
                   threads: int | None = None, progress: bool = True) -> dict:
    """Pre-train a multi-task model on `dataset` with its preset (overridable) and write the model directory
    `out` (model.json card + weights.pt). Returns {"out", "weights_sha256", "seconds", "metrics"}."""
    from cut.checkpoint import save_model
    from cut.data import get_dataset
    from cut.models import ModelConfig, build_model, count_macs, count_params, load_mobilenet_imagenet

    preset = preset_for(dataset, backbone=backbone, width=width, epochs=epochs, batch_size=batch_size, lr=lr)
    torch.manual_seed(seed)
    train_kwargs = dataset_kwargs(dataset, "train", preset, data_dir, train_samples)
    test_kwargs = dataset_kwargs(dataset, "test", preset, data_dir, test_samples)
    train_set, test_set = get_dataset(dataset, "train", **train_kwargs), get_dataset(dataset, "test", **test_kwargs)
    config = ModelConfig(tasks=tuple(train_set.tasks), backbone=preset["backbone"], width=preset["width"],
                         in_channels=train_set.in_channels, input_size=tuple(train_set.input_size),
                         stem_pool=preset.get("stem_pool", True))
    model = build_model(config)
    if imagenet:
        loaded = load_mobilenet_imagenet(model, imagenet_weights)
        print(f"loaded {loaded} ImageNet tensors into the MobileNetV2 backbone", file=sys.stderr)
    torch.set_num_threads(threads or torch.get_num_threads())
    train_loader = make_loader(train_set, preset["batch_size"], shuffle=True, seed=seed)
    test_loader = make_loader(test_set, 64, shuffle=False)
    print(f"pre-training {config.backbone} x{config.width} on {dataset}: tasks "
          f"{','.join(config.task_names)}, {count_params(model):,} params, {len(train_set)} train / "
          f"{len(test_set)} test samples, {preset['epochs']} epochs", file=sys.stderr)
    result = pretrain(model, train_loader, test_loader, epochs=preset["epochs"], lr=preset["lr"], progress=progress)
    card = {
        "dataset": dataset,
        "dataset_kwargs": train_kwargs,
        "test_kwargs": test_kwargs,
        "recipe": {k: preset[k] for k in ("epochs", "batch_size", "lr")} | {"seed": seed},
        "metrics": result["metrics"],
        "train_seconds": result["seconds"],
        "params": count_params(model),
        "macs": count_macs(model),
    }
    digest = save_model(out, model, card)
    return {"out": str(out), "weights_sha256": digest, "seconds": round(result["seconds"], 1),
            "metrics": result["metrics"]}
