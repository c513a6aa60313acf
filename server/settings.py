"""Federation settings: a scenario file (TOML) read into typed, validated dataclasses.

Every section and key is optional (defaults below are the embedded default scenario); an unknown key is
an error that names it, so a typo never silently runs the default. A scenario is named by a path or by
the name of a file in simulations/ (`default`, `fleet-1000`).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from client.device import DataSpec, DeviceClass, FleetSpec

AGGREGATIONS = ("weighted-mean", "median", "trimmed-mean")
TRANSPORTS = ("path", "arrays")


@dataclass(frozen=True)
class ScoringSettings:
    criterion: str = "fisher"
    num_batches: int = 2
    batch_size: int = 16
    dtype: str = "float16"
    aggregation: str = "weighted-mean"
    clip_norm: float = 0.0  # device side, per task vector (L2): the DP sensitivity
    noise_multiplier: float = 0.0  # device side: Gaussian std = noise_multiplier * clip_norm
    dp_delta: float = 1e-5  # the delta at which the report states the epsilon spent
    trim_fraction: float = 0.1  # trimmed-mean: share of devices dropped at each end, per coordinate
    server_clip: float = 0.0  # > 0: server clips each device's vector to server_clip x the median norm
    secure_aggregation: bool = False  # per-task sums under SecAgg+ (the server never sees one report)


@dataclass(frozen=True)
class PlanningSettings:
    personalisation: float = 0.0  # alpha: share of the device's own scores in its plan
    normalise: str = "global"
    round_to: int = 8
    min_channels: int = 8
    min_fraction: float = 0.25


@dataclass(frozen=True)
class FinetuneSettings:
    rounds: int = 2
    steps: int = 24
    lr: float = 1e-3
    batch_size: int = 16
    distill_weight: float = 0.5


@dataclass(frozen=True)
class EvaluationSettings:
    batch_size: int = 32
    oneshot: bool = True


@dataclass(frozen=True)
class DeviceSettings:
    """What a device does with weights it adopts from the server (deliver, FedAvg results)."""

    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics on its own samples (no weight change)
    bn_batches: int = 4
    bn_batch_size: int = 16


@dataclass(frozen=True)
class Timeouts:
    nodes: float = 120.0
    profile: float = 300.0
    score: float = 600.0
    deliver: float = 600.0
    finetune: float = 900.0
    evaluate: float = 600.0


@dataclass(frozen=True)
class Settings:
    name: str
    devices: int
    seed: int
    min_devices: int
    base_model_dir: Path
    transport: str
    out_dir: Path
    fleet: FleetSpec
    data: DataSpec
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    planning: PlanningSettings = field(default_factory=PlanningSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_in_flight: int = 256  # messages pushed but not yet answered (bounds server memory)
    resume: bool = False  # continue from out_dir/state (kept reports, aggregate, plans, weights)

    def validate(self) -> None:
        if self.devices < 1:
            raise ValueError(f"scenario {self.name!r}: devices must be >= 1, got {self.devices}")
        if not 1 <= self.min_devices:
            raise ValueError(f"scenario {self.name!r}: min_devices must be >= 1")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"scenario {self.name!r}: model.transport must be one of {', '.join(TRANSPORTS)}")
        if self.scoring.aggregation not in AGGREGATIONS:
            raise ValueError(f"scenario {self.name!r}: scoring.aggregation must be one of {', '.join(AGGREGATIONS)}")
        if not 0.0 <= self.scoring.trim_fraction < 0.5:
            raise ValueError(f"scenario {self.name!r}: scoring.trim_fraction must be in [0, 0.5)")
        if self.scoring.clip_norm < 0 or self.scoring.noise_multiplier < 0 or self.scoring.server_clip < 0:
            raise ValueError(f"scenario {self.name!r}: scoring clip_norm, noise_multiplier, server_clip must be >= 0")
        if self.scoring.noise_multiplier > 0 and self.scoring.clip_norm <= 0:
            raise ValueError(f"scenario {self.name!r}: scoring.noise_multiplier needs clip_norm > 0 (the sensitivity)")
        if not 0.0 < self.scoring.dp_delta < 1.0:
            raise ValueError(f"scenario {self.name!r}: scoring.dp_delta must be in (0, 1)")
        if self.scoring.dtype not in ("float16", "float32"):
            raise ValueError(f"scenario {self.name!r}: scoring.dtype must be float16 or float32")
        if not 0.0 <= self.planning.personalisation <= 1.0:
            raise ValueError(f"scenario {self.name!r}: planning.personalisation must be in [0, 1]")
        if self.scoring.secure_aggregation:  # the server holds only sums (server.secagg)
            if self.scoring.aggregation != "weighted-mean" or self.scoring.server_clip > 0:
                raise ValueError(f"scenario {self.name!r}: scoring.secure_aggregation gives the server only sums, so "
                                 f"aggregation must be weighted-mean and server_clip 0 (a robust rule needs the "
                                 f"individual reports), got {self.scoring.aggregation!r}, "
                                 f"server_clip {self.scoring.server_clip:g}")
            if self.planning.personalisation > 0:
                raise ValueError(f"scenario {self.name!r}: scoring.secure_aggregation needs planning.personalisation "
                                 f"0 (personalisation blends in a device's own scores, which the server never sees)")
        if self.finetune.rounds < 0 or self.finetune.steps < 0:
            raise ValueError(f"scenario {self.name!r}: finetune rounds and steps must be >= 0")
        if self.data.samples_per_device < 2 or not 0 < self.data.eval_fraction < 1:
            raise ValueError(f"scenario {self.name!r}: data.samples_per_device >= 2 and 0 < eval_fraction < 1 needed")


_SECTIONS = {"scenario", "model", "data", "scoring", "planning", "finetune", "evaluation", "device", "timeouts",
             "fleet"}


def scenario_path(name_or_path: str | Path) -> Path:
    """A scenario file: an existing path, or the name of a file shipped in simulations/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = Path(__file__).resolve().parent.parent / "simulations" / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in shipped.parent.glob("*.toml"))
    raise ValueError(f"unknown scenario {str(name_or_path)!r}: not a file, and not one of {', '.join(known)}")


def _take(section: dict[str, Any], cls: type, where: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(section) - names
    if unknown:
        raise ValueError(f"scenario [{where}]: unknown key(s) {', '.join(sorted(unknown))}")
    typed = {}
    for f in fields(cls):
        if f.name in section:
            value = section[f.name]
            default = f.default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"scenario [{where}] {f.name}: expected true/false, got {value!r}")
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            typed[f.name] = value
    return cls(**typed)


def _fleet(section: dict[str, Any], data: DataSpec, seed: int) -> FleetSpec:
    unknown = set(section) - {"tasks", "classes", "subsets", "devices"}
    if unknown:
        raise ValueError(f"scenario [fleet]: unknown key(s) {', '.join(sorted(unknown))}")
    classes = tuple(_take(c, DeviceClass, "fleet.classes") for c in section.get("classes", [])) or (
        DeviceClass("micro", 0.3), DeviceClass("mobile", 0.5), DeviceClass("edge-gpu", 0.7))
    subsets = []
    for s in section.get("subsets", []):
        if set(s) - {"tasks", "weight"}:
            raise ValueError(f"scenario [fleet.subsets]: unknown key(s) {sorted(set(s) - {'tasks', 'weight'})}")
        subsets.append((tuple(s["tasks"]), float(s.get("weight", 1.0))))
    overrides = {}
    for d in section.get("devices", []):
        if "id" not in d:
            raise ValueError("scenario [[fleet.devices]]: every entry needs an id (partition id)")
        overrides[int(d["id"])] = {k: v for k, v in d.items() if k != "id"}
    return FleetSpec(tasks=tuple(section.get("tasks", ("seg", "depth", "normals"))), classes=classes,
                     subsets=tuple(subsets), overrides=overrides, data=data, seed=seed)


def load_settings(
    scenario: str | Path = "default",
    *,
    devices: int | None = None,
    out_dir: str | Path | None = None,
    base_model_dir: str | Path | None = None,
    clip_norm: float | None = None,
    noise_multiplier: float | None = None,
    epsilon: float | None = None,
    aggregation: str | None = None,
    trim_fraction: float | None = None,
    server_clip: float | None = None,
) -> Settings:
    """Read a scenario (path or shipped name) and apply command-line overrides.

    The [scoring] overrides replace the scenario's keys. `epsilon` (instead of `noise_multiplier`) picks
    the smallest noise multiplier whose reports spend at most epsilon at scoring.dp_delta for a device
    holding the most tasks the fleet allows (server.privacy), given the clip norm.
    """
    path = scenario_path(scenario)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"scenario {path}: not valid TOML ({e})") from None
    unknown = set(raw) - _SECTIONS
    if unknown:
        raise ValueError(f"scenario {path}: unknown section(s) {', '.join(sorted(unknown))}")
    head = dict(raw.get("scenario", {}))
    extra = set(head) - {"name", "devices", "seed", "min_devices", "max_in_flight"}
    if extra:
        raise ValueError(f"scenario [scenario]: unknown key(s) {', '.join(sorted(extra))}")
    model = dict(raw.get("model", {}))
    if set(model) - {"base", "transport"}:
        raise ValueError(f"scenario [model]: unknown key(s) {', '.join(sorted(set(model) - {'base', 'transport'}))}")
    seed = int(head.get("seed", 0))
    data = _take(raw.get("data", {}), DataSpec, "data")
    fleet = _fleet(raw.get("fleet", {}), data, seed)
    name = str(head.get("name", path.stem))
    scoring = _scoring(raw.get("scoring", {}), fleet, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                       epsilon=epsilon, aggregation=aggregation, trim_fraction=trim_fraction,
                       server_clip=server_clip)
    settings = Settings(
        name=name,
        devices=int(devices if devices is not None else head.get("devices", 20)),
        seed=seed,
        min_devices=int(head.get("min_devices", 1)),
        max_in_flight=int(head.get("max_in_flight", 256)),
        base_model_dir=Path(base_model_dir or model.get("base", "runs/pretrained-scenes")),
        transport=str(model.get("transport", "path")),
        out_dir=Path(out_dir or Path("runs") / "simulate"),
        fleet=fleet,
        data=data,
        scoring=scoring,
        planning=_take(raw.get("planning", {}), PlanningSettings, "planning"),
        finetune=_take(raw.get("finetune", {}), FinetuneSettings, "finetune"),
        evaluation=_take(raw.get("evaluation", {}), EvaluationSettings, "evaluation"),
        device=_take(raw.get("device", {}), DeviceSettings, "device"),
        timeouts=_take(raw.get("timeouts", {}), Timeouts, "timeouts"),
    )
    settings.validate()
    return settings


def _scoring(section: dict[str, Any], fleet: FleetSpec, epsilon: float | None = None,
             **overrides: Any) -> ScoringSettings:
    """[scoring] with command-line overrides; a target epsilon becomes a noise multiplier."""
    scoring = _take(section, ScoringSettings, "scoring")
    changes = {k: (float(v) if k != "aggregation" else v) for k, v in overrides.items() if v is not None}
    scoring = replace(scoring, **changes)
    if epsilon is None:
        return scoring
    from server.privacy import fleet_max_tasks, noise_for_epsilon

    if overrides.get("noise_multiplier") is not None:
        raise ValueError("give a noise multiplier or a target epsilon, not both")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"target epsilon must be a finite number > 0, got {epsilon!r}")
    if scoring.clip_norm <= 0:
        raise ValueError("a target epsilon needs scoring.clip_norm > 0 (the sensitivity the noise is scaled to)")
    if not 0.0 < scoring.dp_delta < 1.0:
        raise ValueError("scoring.dp_delta must be in (0, 1)")
    return replace(scoring, noise_multiplier=noise_for_epsilon(float(epsilon), fleet_max_tasks(fleet),
                                                               scoring.dp_delta))


def from_run_config(run_config: dict[str, Any]) -> Settings:
    """Settings for `flwr run`: `scenario`, and optionally `devices`, `out-dir`, `base-model`, `resume`."""
    devices = int(run_config.get("devices", 0) or 0) or None
    settings = load_settings(
        str(run_config.get("scenario", "") or "default"),
        devices=devices,
        out_dir=str(run_config.get("out-dir", "") or "") or None,
        base_model_dir=str(run_config.get("base-model", "") or "") or None,
    )
    resume = run_config.get("resume", False)
    if not isinstance(resume, bool):
        raise ValueError(f"run config resume: expected true or false, got {resume!r}")
    return replace(settings, resume=resume)


def resolve(settings: Settings, card: dict[str, Any]) -> Settings:
    """Settings completed from the base model's card: devices' data built like the base model's (dataset,
    image size...) with the scenario's data seed (so device data is not the pre-training data) and its own
    dataset kwargs on top; simulated devices keep their models under out_dir/store."""
    dataset = settings.data.dataset or str(card.get("dataset", ""))
    if not dataset:
        raise ValueError(f"scenario {settings.name!r}: [data] dataset is not set and the base model card names none")
    kwargs = {k: v for k, v in card.get("dataset_kwargs", {}).items() if k != "num_samples"}
    if dataset != card.get("dataset"):
        kwargs = {}
    if "seed" in kwargs:
        kwargs["seed"] = settings.data.seed
    data = replace(settings.data, dataset=dataset, dataset_kwargs={**kwargs, **settings.data.dataset_kwargs})
    store_root = settings.fleet.store_root or str((settings.out_dir / "store").resolve())
    return replace(settings, data=data, fleet=replace(settings.fleet, data=data, store_root=store_root))


__all__ = [
    "DeviceSettings",
    "EvaluationSettings",
    "FinetuneSettings",
    "PlanningSettings",
    "ScoringSettings",
    "Settings",
    "Timeouts",
    "from_run_config",
    "load_settings",
    "scenario_path",
    "resolve",
]
