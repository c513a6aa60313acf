"""Typed configs of each phase: what travels in a message's `config` record beside the protobuf messages.

Each is a frozen dataclass whose defaults are defined here once: the server builds one from its settings
and sends `to_record()`; the device reads it back with `from_record()`, which checks every value's type
and bounds (a ValidationError naming the field otherwise) and takes a missing optional field's default.
Fields whose value is None are not sent (a transport-specific field of the other transport).

| phase          | record               | config                          |
|----------------|----------------------|---------------------------------|
| query.profile  | CONFIG               | ProfileConfig (the data the base model expects) |
| query.score    | REQUEST              | ScoreConfig (+ the ScoringRequest bytes in `data`) |
| train.deliver  | CONFIG               | DeliverConfig + Adoption        |
| train.finetune | CONFIG               | FinetuneConfig + Adoption       |
| evaluate       | CONFIG               | EvaluateConfig + Adoption       |
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flwr.app import ConfigRecord

from cut.messages import ValidationError
from protocol.records import field as record_field

TRANSPORTS = ("path", "arrays")
SCORE_DTYPES = ("float16", "float32")


class PhaseConfig:
    """to_record / from_record for a flat dataclass of str, bytes, int, float and bool fields."""

    WHERE: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.to_dict())

    @classmethod
    def from_record(cls, record: ConfigRecord | None, where: str | None = None):
        """The config in `record` (None: every field's default); keys of other configs are ignored."""
        where = where or cls.WHERE
        if record is None:
            record = ConfigRecord()
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in record:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValidationError(f"{where}: missing field {f.name!r}")
                continue
            values[f.name] = record_field(record, f.name, _base_type(hints[f.name]), where)
        config = cls(**values)
        config.check(where)
        return config

    def check(self, where: str) -> None:
        """Bounds of the values (after the types were checked)."""


def _base_type(hint: Any) -> type:
    """`int`, or `str | None` -> str: the type a record value must have."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@dataclass(frozen=True)
class DataSpec:
    """Where a device's data comes from by default: a pool of `dataset` split across devices.

    The server sends it with the profile query because it knows what the base model expects (dataset,
    image size); a real device's node config overrides any of it (client.device)."""

    dataset: str = ""  # "" = the dataset the base model was trained on (filled in from its card)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # builder kwargs (num_samples = pool size)
    samples_per_device: int = 48
    partition: str = "dirichlet"  # "iid" | "dirichlet" (over the dataset's attribute, e.g. room type)
    alpha: float = 0.5
    min_samples: int = 8
    eval_fraction: float = 0.25  # share of a device's samples held out for its own evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        checks = {
            "dataset": isinstance(self.dataset, str) and len(self.dataset) <= 64,
            "dataset_kwargs": isinstance(self.dataset_kwargs, dict),
            "samples_per_device": isinstance(self.samples_per_device, int) and 2 <= self.samples_per_device <= 10**6,
            "partition": self.partition in ("iid", "dirichlet"),
            "alpha": number(self.alpha) and self.alpha > 0,
            "min_samples": isinstance(self.min_samples, int) and self.min_samples >= 1,
            "eval_fraction": number(self.eval_fraction) and 0 < self.eval_fraction < 1,
            "seed": isinstance(self.seed, int) and not isinstance(self.seed, bool),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"data spec: bad value of {', '.join(bad)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "data spec") -> DataSpec:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            return cls(**raw)
        except (ValueError, TypeError) as e:
            raise ValidationError(f"{where}: bad data spec ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class ProfileConfig(PhaseConfig):
    """query.profile: the data the base model expects (JSON of a DataSpec), and the base model's architecture
    (config JSON) and sha256, so that a device with a latency budget can time the model's shapes on its own
    runtime (no weights needed: time does not depend on their values) and send its table with its profile."""

    WHERE: ClassVar[str] = "profile query"
    data_spec: str = ""
    architecture: str = ""
    base_model_sha256: str = ""

    def data(self) -> DataSpec | None:
        return DataSpec.from_json(self.data_spec, self.WHERE) if self.data_spec else None


@dataclass(frozen=True)
class ScoreConfig(PhaseConfig):
    """query.score: the ScoringRequest bytes and how the base model reaches the device."""

    WHERE: ClassVar[str] = "request"
    data: bytes
    transport: str = "path"  # "path": a directory both sides can read; "arrays": the weights travel
    dtype: str = "float16"  # of the score vectors on the wire
    seed: int = 0  # of the device's batch order (mixed with its partition id)
    base_model_dir: str | None = None  # path transport
    architecture: str | None = None  # arrays transport: the decomposed model's config (JSON)
    base_arrays_sha256: str | None = None  # arrays transport

    def check(self, where: str) -> None:
        if self.transport not in TRANSPORTS:
            raise ValidationError(f"ScoringRequest: unknown model transport {self.transport!r}")
        if self.dtype not in SCORE_DTYPES:
            raise ValidationError(f"{where}: dtype must be one of {', '.join(SCORE_DTYPES)}, got {self.dtype!r}")
        needed = ("base_model_dir",) if self.transport == "path" else ("architecture", "base_arrays_sha256")
        for name in needed:
            if getattr(self, name) is None:
                raise ValidationError(f"{where}: missing field {name!r}")


@dataclass(frozen=True)
class Adoption(PhaseConfig):
    """How a device adopts server weights (a delivered model or a FedAvg result): re-estimating BatchNorm
    statistics on its own samples first, since pruning and averaging shift them; then, for a delivered
    model, optionally adapting it locally (client.adapt), kept only if it helps on its own validation half."""

    WHERE: ClassVar[str] = "config"
    recalibrate_bn: bool = False
    bn_batches: int = 4
    bn_batch_size: int = 16
    adapt_steps: int = 0  # 0 = no on-device adaptation
    adapt_lr: float = 3e-5  # measured: 1e-3 harms a recovered model (client/adapt.py)
    adapt_batch_size: int = 16

    def check(self, where: str) -> None:
        _positive(where, bn_batches=self.bn_batches, bn_batch_size=self.bn_batch_size,
                  adapt_batch_size=self.adapt_batch_size)
        if self.adapt_steps < 0 or not self.adapt_lr > 0:
            raise ValidationError(f"{where}: adapt_steps >= 0 and adapt_lr > 0 needed")


@dataclass(frozen=True)
class DeliverConfig(PhaseConfig):
    """train.deliver: whether to evaluate the delivered model at once (one-shot figures), and how."""

    WHERE: ClassVar[str] = "config"
    evaluate: bool = False
    batch_size: int = 32

    def check(self, where: str) -> None:
        _positive(where, batch_size=self.batch_size)


@dataclass(frozen=True)
class FinetuneConfig(PhaseConfig):
    """train.finetune: one round of local distillation from the dense base model."""

    WHERE: ClassVar[str] = "config"
    weights_sha256: str
    round: int = 0
    steps: int = 24
    lr: float = 1e-3
    batch_size: int = 16
    distill_weight: float = 0.5
    seed: int = 0

    def check(self, where: str) -> None:
        _positive(where, batch_size=self.batch_size)
        if self.steps < 0 or not 0.0 <= self.distill_weight <= 1.0 or not self.lr > 0:
            raise ValidationError(f"{where}: steps >= 0, lr > 0 and distill_weight in [0, 1] needed")


@dataclass(frozen=True)
class EvaluateConfig(PhaseConfig):
    """evaluate: dense vs the held compact model on the device's held-out samples."""

    WHERE: ClassVar[str] = "config"
    weights_sha256: str
    batch_size: int = 32

    def check(self, where: str) -> None:
        _positive(where, batch_size=self.batch_size)


def _positive(where: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValidationError(f"{where}: {name} must be >= 1, got {value}")


def merged(*configs: PhaseConfig) -> ConfigRecord:
    """One config record holding several configs' fields (e.g. DeliverConfig + Adoption)."""
    out: dict[str, Any] = {}
    for config in configs:
        out.update(config.to_dict())
    return ConfigRecord(out)


__all__ = ["Adoption", "DataSpec", "DeliverConfig", "EvaluateConfig", "FinetuneConfig", "PhaseConfig",
           "ProfileConfig", "SCORE_DTYPES", "ScoreConfig", "TRANSPORTS", "merged"]
