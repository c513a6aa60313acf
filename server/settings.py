"""Federation settings: a scenario file (TOML) read into declared, validated models (pydantic v2).

Every section and key is optional; the defaults below are the embedded default scenario, and defaults
that also travel to devices are those of protocol.phases (defined once). An unknown key, a wrong type or
a value out of range is an error that names the file, the key and what is allowed, so a typo never
silently runs the default. `scenario_schema()` is the JSON schema (`cutfl simulate --print-schema`).

The `[fleet]` section describes simulated devices; it is declared here (so a typo in it is caught like
any other) but read by simulations.scenario, which also applies the command line's overrides. The server
takes finished `Settings`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cut.recovery import RecoveryConfig
from protocol.phases import Adoption, DataSpec, DeliverConfig, FinetuneConfig, ScoreConfig
from server.identity import check_pin

AGGREGATIONS = ("weighted-mean", "median", "trimmed-mean")
TRANSPORTS = ("path", "arrays")
SHIPPED_SCENARIOS = Path(__file__).resolve().parent.parent / "simulations"  # scenario files shipped by name


class Section(BaseModel):
    """A TOML section: no unknown keys, no silent type conversions (an int is accepted for a float)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ScenarioHead(Section):
    name: str = ""  # "" = the file's stem
    devices: int = Field(20, ge=1)
    seed: int = 0
    min_devices: int = Field(1, ge=1)
    max_in_flight: int = Field(256, ge=1, description="messages pushed but not yet answered (bounds server memory)")


class ModelSection(Section):
    base: str = "runs/pretrained-scenes"
    transport: Literal["path", "arrays"] = ScoreConfig.transport


class DataSection(Section):
    """What data devices score on by default (sent as protocol.phases.DataSpec); a real device's node config
    overrides. The defaults are simulations/default.toml's, so a scenario that leaves [data] out still gives
    every device enough held-out samples to evaluate on (EVALUATION.md: >= 48) and data other than the
    base model's pre-training data (seed 1; pre-training uses seed 0)."""

    dataset: str = ""
    dataset_kwargs: dict[str, Any] = Field(default_factory=dict)
    samples_per_device: int = Field(160, ge=2)
    partition: Literal["iid", "dirichlet"] = DataSpec.partition
    alpha: float = Field(DataSpec.alpha, gt=0)
    min_samples: int = Field(96, ge=1)
    eval_fraction: float = Field(0.5, gt=0, lt=1)
    seed: int = 1

    def spec(self) -> DataSpec:
        return DataSpec(**self.model_dump())


class ScoringSettings(Section):
    criterion: str = "fisher"
    num_batches: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    dtype: Literal["float16", "float32"] = ScoreConfig.dtype
    aggregation: Literal["weighted-mean", "median", "trimmed-mean"] = "weighted-mean"
    clip_norm: float = Field(0.0, ge=0, description="device side, per task vector (L2): the DP sensitivity")
    noise_multiplier: float = Field(0.0, ge=0, description="device side: Gaussian std = noise_multiplier * clip_norm")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="the delta at which the report states the epsilon spent")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed-mean: share dropped at each end")
    server_clip: float = Field(0.0, ge=0, description="> 0: clip each device's vector to this x the median norm")
    secure_aggregation: bool = Field(False, description="per-task sums under SecAgg+ (no single report is seen)")
    privacy: Literal["none", "local", "distributed"] = Field(
        "local", description="none: no noise; local: each report clipped and noised on its device (clip_norm, "
                             "noise_multiplier; noise_multiplier 0 = no DP claim); distributed: each device adds "
                             "a share of the noise inside the SecAgg+ vector, the unmasked sum carries it all "
                             "(needs secure_aggregation; dp_* keys; server.privacy)")
    dp_noise_multiplier: float = Field(0.0, ge=0, description="distributed: noise std of the unmasked sum = this "
                                                              "x dp_clip per coordinate (the central noise)")
    dp_clip: float = Field(0.1, gt=0, description="distributed: L2 clip of each task's transformed vector "
                                                   "T(s)/sqrt(channels) (its norm lies in [channels^-1/4, 1] for "
                                                   "fourth-root): at 0.1 every vector is scaled to it, so the "
                                                   "noise only competes with directions (BENCHMARKS.md)")
    dp_transform: Literal["none", "sqrt", "fourth-root"] = Field(
        "fourth-root", description="distributed: score transform on the device, inverted on the server")
    dp_shrinkage: bool = Field(True, description="distributed: the server shrinks the noisy mean towards each "
                                                 "group's mean by the known noise variance (post-processing)")
    dp_min_devices: int = Field(0, ge=0, description="distributed: the fewest devices whose noise shares must "
                                                     "be in the sum (each adds 1/sqrt of it); fewer survivors "
                                                     "abort the release before unmasking; 0 = every device "
                                                     "asked to score")
    dp_prior_releases: int = Field(0, ge=0, description="distributed: earlier releases of the same devices' "
                                                        "data (other runs), composed into the stated epsilon")

    @model_validator(mode="after")
    def _consistent(self) -> ScoringSettings:
        if self.noise_multiplier > 0 and self.clip_norm <= 0:
            raise ValueError("noise_multiplier needs clip_norm > 0 (the sensitivity)")
        if self.privacy == "none" and self.noise_multiplier > 0:
            raise ValueError("privacy 'none' adds no noise: set noise_multiplier 0, or privacy 'local'")
        if self.privacy == "distributed":
            if not self.secure_aggregation:
                raise ValueError("privacy 'distributed' needs secure_aggregation = true (the noise shares only "
                                 "add up to the calibrated noise in the secure sum)")
            if self.dp_noise_multiplier <= 0:
                raise ValueError("privacy 'distributed' needs dp_noise_multiplier > 0 (or cutfl simulate --epsilon)")
            if self.noise_multiplier > 0 or self.clip_norm > 0:
                raise ValueError("privacy 'distributed' replaces the local clip and noise: set clip_norm 0 and "
                                 "noise_multiplier 0 (dp_clip and dp_noise_multiplier apply)")
            if self.dp_min_devices == 1:
                raise ValueError("dp_min_devices must be 0 (every device asked) or >= 2 (secure aggregation)")
        if self.secure_aggregation and (self.aggregation != "weighted-mean" or self.server_clip > 0):
            raise ValueError(f"secure_aggregation gives the server only sums, so aggregation must be weighted-mean "
                             f"and server_clip 0 (a robust rule needs the individual reports), got "
                             f"{self.aggregation!r}, server_clip {self.server_clip:g}")
        return self


class PlanningSettings(Section):
    personalisation: float = Field(0.0, ge=0, le=1, description="alpha: share of the device's own scores in its plan")
    normalise: str = "global"
    round_to: int = Field(8, ge=1)
    min_channels: int = Field(8, ge=1)
    min_fraction: float = Field(0.25, ge=0, le=1)
    latency_checks: int = Field(2, ge=0, description="a device whose delivered model measured off its latency "
                                                      "budget (more than 3% over or 6% under) is planned again "
                                                      "with that measurement in its table, recovered and "
                                                      "delivered again, at most this many times (0: never); one "
                                                      "whose last plan measured over ends with the earlier plan "
                                                      "that fitted, else the one least over")


class RecoverySettings(Section):
    """Server-side recovery before delivery (server.recovery): each distinct plan's compact model distilled
    from the dense model on data the server holds, never on device data."""

    data: str = Field("pretrain", description="'pretrain' (the base model's pre-training split, from its card) "
                                               "or a directory of unlabelled PNG/JPG images")
    samples: int = Field(512, ge=1, description="how many of those samples are used")
    steps: int = Field(300, ge=0, description="optimiser steps per plan (0 = deliver the pruned model as is)")
    batch_size: int = Field(RecoveryConfig.batch_size, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_fraction: float = Field(RecoveryConfig.warmup_fraction, ge=0, le=1)
    # the federation's own measured recipe (BENCHMARKS.md), pinned here rather than taken from the engine's
    distill_weight: float = Field(1.0, ge=0, le=1, description="1.0 = output distillation only")
    feature_weight: float = Field(0.0, ge=0, description="attention transfer at the backbone stages")
    freeze_bn: bool = RecoveryConfig.freeze_bn
    seed: int = 0
    workers: int = Field(2, ge=1, description="plans trained side by side, one thread each (1: one plan at a "
                                               "time on all of torch's threads)")

    def config(self) -> RecoveryConfig:
        return RecoveryConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                              warmup_fraction=self.warmup_fraction, distill_weight=self.distill_weight,
                              feature_weight=self.feature_weight, freeze_bn=self.freeze_bn)


class FinetuneSettings(Section):
    """Federated fine-tuning (opt-in): devices of one plan distil locally and upload weights for FedAvg."""

    rounds: int = Field(0, ge=0, description="FedAvg rounds among devices that share a plan (0 = off: only "
                                              "scores leave a device)")
    gate: bool = Field(True, description="adopt an average only if it is no further from the dense teacher "
                                         "on the server's validation data than the weights it replaces")
    steps: int = Field(FinetuneConfig.steps, ge=0)
    lr: float = Field(FinetuneConfig.lr, gt=0)
    batch_size: int = Field(FinetuneConfig.batch_size, ge=1)
    distill_weight: float = Field(FinetuneConfig.distill_weight, ge=0, le=1)
    clip_multiple: float = Field(2.0, ge=1.0, le=100.0,
                                 description="bound on an update's delta (update minus the round's starting "
                                             "weights): in a plan of 3+ devices one whose norm exceeds this "
                                             "multiple of the median delta norm is excluded; the rest, and "
                                             "pairs, are clipped to it (server.aggregate.bound_updates)")


class EvaluationSettings(Section):
    batch_size: int = Field(DeliverConfig.batch_size, ge=1)
    oneshot: bool = True


class DeviceSettings(Section):
    """What a device does with weights it adopts from the server (protocol.phases.Adoption)."""

    recalibrate_bn: bool = Adoption.recalibrate_bn
    bn_batches: int = Field(Adoption.bn_batches, ge=1)
    bn_batch_size: int = Field(Adoption.bn_batch_size, ge=1)
    adapt_steps: int = Field(Adoption.adapt_steps, ge=0, description="on-device adaptation of the delivered model "
                                                                     "(0 = off); kept only if it helps locally")
    adapt_lr: float = Field(Adoption.adapt_lr, gt=0)
    adapt_batch_size: int = Field(Adoption.adapt_batch_size, ge=1)

    def adoption(self) -> Adoption:
        return Adoption(**self.model_dump())


class IdentitySettings(Section):
    """Who may claim which device id (server.identity). A device is the node Flower authenticated; its
    declared device id is a label, unique in a run, and in deployment it can be pinned to a node."""

    pinned_ids: dict[str, str] = Field(
        default_factory=dict,
        description="device id -> the key fingerprint ('SHA256:...', as `ssh-keygen -lf KEY.pub` prints it) or "
                    "the node id (a string) that alone may claim it; a pinned node may claim no other id")

    @field_validator("pinned_ids")
    @classmethod
    def _pins(cls, pins: dict[str, str]) -> dict[str, str]:
        for device_id, value in pins.items():
            try:
                check_pin(value)
            except ValueError as e:
                raise ValueError(f"device id {device_id!r}: {e}") from None
        if len(set(pins.values())) != len(pins):
            raise ValueError("one node is pinned to more than one device id")
        return pins


class Timeouts(Section):
    nodes: float = Field(120.0, gt=0)
    profile: float = Field(300.0, gt=0)
    score: float = Field(600.0, gt=0)
    deliver: float = Field(600.0, gt=0)
    finetune: float = Field(900.0, gt=0)
    evaluate: float = Field(600.0, gt=0)


class FleetClass(Section):
    name: str
    budget: float = Field(gt=0, le=1)
    # latency: a fraction of the device's own dense time, on its own latency table (measured at the profile query)
    budget_kind: Literal["params", "macs", "memory", "latency"] = "params"
    weight: float = Field(1.0, ge=0)


class FleetSubset(Section):
    tasks: list[str] = Field(min_length=1)
    weight: float = Field(1.0, ge=0)


class FleetSection(Section):
    """Simulated devices (read by simulations.scenario): classes, task subsets, per-device overrides."""

    tasks: list[str] = Field(default_factory=lambda: ["seg", "depth", "normals"], min_length=1)
    classes: list[FleetClass] = Field(default_factory=list)
    subsets: list[FleetSubset] = Field(default_factory=list)
    devices: list[dict[str, Any]] = Field(default_factory=list, description="overrides: {id = partition id, ...}")


class ScenarioFile(Section):
    """A whole scenario file."""

    scenario: ScenarioHead = ScenarioHead()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    scoring: ScoringSettings = ScoringSettings()
    planning: PlanningSettings = PlanningSettings()
    recovery: RecoverySettings = RecoverySettings()
    finetune: FinetuneSettings = FinetuneSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    device: DeviceSettings = DeviceSettings()
    timeouts: Timeouts = Timeouts()
    identity: IdentitySettings = IdentitySettings()
    fleet: FleetSection = FleetSection()

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioFile:
        if self.finetune.rounds > 0 and (self.scoring.secure_aggregation or self.scoring.noise_multiplier > 0):
            raise ValueError("finetune.rounds > 0 uploads each device's compact weights in the clear, outside the "
                             "secure aggregation and differential privacy that protect its scores: set "
                             "finetune.rounds = 0 (server-side [recovery] needs no device upload)")
        if self.scoring.secure_aggregation and self.planning.personalisation > 0:
            raise ValueError("scoring.secure_aggregation needs planning.personalisation 0 (personalisation blends "
                             "in a device's own scores, which the server never sees)")
        return self


@dataclass(frozen=True)
class Settings:
    """What the server runs with: the scenario's sections, resolved paths and the run's options."""

    name: str
    devices: int
    seed: int
    min_devices: int
    base_model_dir: Path
    transport: str
    out_dir: Path
    data: DataSpec
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    planning: PlanningSettings = field(default_factory=PlanningSettings)
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    max_in_flight: int = 256
    resume: bool = False  # continue from out_dir/state (kept reports, aggregate, plans, weights)

    def with_scoring(self, **changes: Any) -> Settings:
        """These [scoring] keys replaced, validated like the file's."""
        try:
            scoring = ScoringSettings.model_validate({**self.scoring.model_dump(), **changes})
        except pydantic.ValidationError as e:
            raise ValueError(f"scenario {self.name!r}: {describe(e, 'scoring')}") from None
        if self.finetune.rounds > 0 and (scoring.secure_aggregation or scoring.noise_multiplier > 0):
            raise ValueError(f"scenario {self.name!r}: finetune.rounds > 0 uploads weights outside the privacy of "
                             f"the scores; set finetune.rounds = 0 to use noise or secure aggregation")
        return dataclasses.replace(self, scoring=scoring)


def scenario_path(name_or_path: str | Path) -> Path:
    """A scenario file: an existing path, or the name of a file shipped in simulations/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_SCENARIOS / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in SHIPPED_SCENARIOS.glob("*.toml"))
    raise ValueError(f"unknown scenario {str(name_or_path)!r}: not a file, and not one of {', '.join(known)}")


def read_scenario(name_or_path: str | Path) -> tuple[Path, ScenarioFile]:
    """The scenario file, parsed and validated; errors name the file and the key."""
    path = scenario_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"scenario {path}: not valid TOML ({e})") from None
    try:
        return path, ScenarioFile.model_validate(raw)
    except pydantic.ValidationError as e:
        raise ValueError(f"scenario {path}: {describe(e)}") from None


def describe(error: pydantic.ValidationError, section: str = "") -> str:
    """A pydantic error as one line: '[section] key: what is wrong' for each problem."""
    parts = []
    for problem in error.errors():
        loc = ([section] if section else []) + [str(x) for x in problem["loc"]]
        where = f"[{loc[0]}] {'.'.join(loc[1:])}".strip() if loc else "scenario"
        message = problem["msg"].replace("Extra inputs are not permitted", "unknown key").removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def settings_from(path: Path, parsed: ScenarioFile, *, devices: int | None = None, out_dir: str | Path | None = None,
                  base_model_dir: str | Path | None = None) -> Settings:
    """Settings from a parsed scenario file and the run's overrides."""
    head = parsed.scenario
    return Settings(
        name=head.name or path.stem,
        devices=int(devices if devices is not None else head.devices),
        seed=head.seed,
        min_devices=head.min_devices,
        max_in_flight=head.max_in_flight,
        base_model_dir=Path(base_model_dir or parsed.model.base),
        transport=parsed.model.transport,
        out_dir=Path(out_dir or Path("runs") / "simulate"),
        data=parsed.data.spec(),
        scoring=parsed.scoring,
        planning=parsed.planning,
        recovery=parsed.recovery,
        finetune=parsed.finetune,
        evaluation=parsed.evaluation,
        device=parsed.device,
        timeouts=parsed.timeouts,
        identity=parsed.identity,
    )


def load_settings(scenario: str | Path = "default", *, devices: int | None = None, out_dir: str | Path | None = None,
                  base_model_dir: str | Path | None = None) -> Settings:
    """The server's settings of a scenario (path or shipped name), with the run's overrides."""
    path, parsed = read_scenario(scenario)
    if devices is not None and devices < 1:
        raise ValueError(f"scenario {path}: devices must be >= 1, got {devices}")
    return settings_from(path, parsed, devices=devices, out_dir=out_dir, base_model_dir=base_model_dir)


def from_run_config(run_config: dict[str, Any]) -> Settings:
    """Settings for `flwr run`: `scenario`, and optionally `devices`, `out-dir`, `base-model`, `resume`."""
    try:
        devices = int(run_config.get("devices", 0) or 0) or None
    except (TypeError, ValueError):
        raise ValueError(f"run config devices: expected an integer, got {run_config.get('devices')!r}") from None
    settings = load_settings(
        str(run_config.get("scenario", "") or "default"),
        devices=devices,
        out_dir=str(run_config.get("out-dir", "") or "") or None,
        base_model_dir=str(run_config.get("base-model", "") or "") or None,
    )
    resume = run_config.get("resume", False)
    if not isinstance(resume, bool):
        raise ValueError(f"run config resume: expected true or false, got {resume!r}")
    return dataclasses.replace(settings, resume=resume)


def resolve(settings: Settings, card: dict[str, Any]) -> Settings:
    """Settings completed from the base model's card: devices' data built like the base model's (dataset,
    image size...) with the scenario's data seed (so device data is not the pre-training data) and its own
    dataset kwargs on top. Resolving twice changes nothing."""
    return dataclasses.replace(settings, data=data_for_model(settings.data, card, settings.name))


def data_for_model(data: DataSpec, card: dict[str, Any], scenario: str = "") -> DataSpec:
    dataset = data.dataset or str(card.get("dataset", ""))
    if not dataset:
        raise ValueError(f"scenario {scenario!r}: [data] dataset is not set and the base model card names none")
    kwargs = {k: v for k, v in card.get("dataset_kwargs", {}).items() if k != "num_samples"}
    if dataset != card.get("dataset"):
        kwargs = {}
    if "seed" in kwargs:
        kwargs["seed"] = data.seed
    return dataclasses.replace(data, dataset=dataset, dataset_kwargs={**kwargs, **data.dataset_kwargs})


def scenario_schema() -> dict[str, Any]:
    """The JSON schema of a scenario file."""
    return ScenarioFile.model_json_schema()


__all__ = [
    "AGGREGATIONS",
    "DeviceSettings",
    "EvaluationSettings",
    "FinetuneSettings",
    "IdentitySettings",
    "PlanningSettings",
    "RecoverySettings",
    "ScenarioFile",
    "ScoringSettings",
    "Settings",
    "Timeouts",
    "data_for_model",
    "from_run_config",
    "load_settings",
    "read_scenario",
    "resolve",
    "scenario_path",
    "scenario_schema",
    "settings_from",
]
