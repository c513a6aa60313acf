"""Who a device is: its tasks, budget, class, data partition and local store, and its TaskProfile.

A real device knows this about itself and is started with it (`flower-supernode --node-config
"device-id='cam-7' tasks='seg,depth' budget=0.5 device-class='board' partition-id=3 num-partitions=20"`).
A simulated device has only Flower's `partition-id` / `num-partitions`; it derives the rest
deterministically from the scenario's fleet description (`FleetSpec`), which the server sends with the
profile query. The derivation is a pure function of (fleet seed, partition id), so a scenario replays
exactly and the server never needs to know which node holds which partition.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from cut.messages import Budget, TaskProfile, ValidationError

# How a test device misbehaves: corrupt reports (nan, wrong-length, unknown-task, negative), fail while
# scoring (crash), claim a task the model lacks (bad-profile), answer the score query after the server's
# timeout (slow: sleeps slow_seconds), or drop out of the federation at a later phase (drop-<phase>: the
# device goes away, and the server gets the error Flower sends for an unavailable node).
DROPOUT_PHASES = ("deliver", "finetune", "evaluate")
MISBEHAVIOURS = ("", "nan", "wrong-length", "unknown-task", "negative", "crash", "bad-profile", "slow",
                 *(f"drop-{phase}" for phase in DROPOUT_PHASES))


@dataclass(frozen=True)
class DataSpec:
    """Where a device's private data comes from: a pool of `dataset` split across devices."""

    dataset: str = ""  # "" = the dataset the base model was trained on (filled in by the server)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # builder kwargs (num_samples = pool size)
    samples_per_device: int = 48
    partition: str = "dirichlet"  # "iid" | "dirichlet" (over the dataset's attribute, e.g. room type)
    alpha: float = 0.5
    min_samples: int = 8
    eval_fraction: float = 0.25  # share of a device's samples held out for its own evaluation
    seed: int = 0


@dataclass(frozen=True)
class DeviceClass:
    name: str
    budget: float
    budget_kind: str = "params"
    weight: float = 1.0


@dataclass(frozen=True)
class FleetSpec:
    """A scenario's fleet: device classes (budgets), task subsets, per-device overrides, data."""

    tasks: tuple[str, ...]
    classes: tuple[DeviceClass, ...]
    subsets: tuple[tuple[tuple[str, ...], float], ...] = ()  # (tasks, weight); empty = every subset
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)  # partition id -> fields
    data: DataSpec = field(default_factory=DataSpec)
    seed: int = 0
    store_root: str = ""  # simulation: where devices keep delivered models

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("fleet: no tasks")
        if not self.classes:
            raise ValueError("fleet: no device classes")
        if any(c.weight < 0 for c in self.classes) or sum(c.weight for c in self.classes) <= 0:
            raise ValueError("fleet: class weights must be >= 0 and not all 0")
        for tasks, weight in self.subsets:
            unknown = set(tasks) - set(self.tasks)
            if not tasks or unknown or weight < 0:
                raise ValueError(f"fleet: bad task subset {list(tasks)} (weight {weight})")
        for pid, fields in self.overrides.items():
            extra = set(fields) - OVERRIDE_KEYS
            if extra:
                raise ValueError(f"fleet: device {pid} override has unknown keys {sorted(extra)}")
            if fields.get("misbehave", "") not in MISBEHAVIOURS:
                raise ValueError(f"fleet: device {pid}: unknown misbehave {fields['misbehave']!r}")

    def all_subsets(self) -> tuple[tuple[tuple[str, ...], float], ...]:
        if self.subsets:
            return self.subsets
        combos = [c for r in range(1, len(self.tasks) + 1) for c in itertools.combinations(self.tasks, r)]
        return tuple((tuple(c), 1.0) for c in combos)

    def to_json(self) -> str:
        d = asdict(self)
        d["overrides"] = {str(k): v for k, v in self.overrides.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FleetSpec:
        """The fleet description the server sends; anything malformed is a ValidationError naming it."""
        try:
            d = json.loads(text)
            return cls(
                tasks=tuple(d["tasks"]),
                classes=tuple(DeviceClass(**c) for c in d["classes"]),
                subsets=tuple((tuple(t), float(w)) for t, w in d.get("subsets", ())),
                overrides={int(k): dict(v) for k, v in d.get("overrides", {}).items()},
                data=DataSpec(**d.get("data", {})),
                seed=int(d.get("seed", 0)),
                store_root=str(d.get("store_root", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValidationError(f"fleet: bad fleet spec ({type(e).__name__}: {e})") from None


OVERRIDE_KEYS = {"tasks", "class", "budget", "budget_kind", "priority", "misbehave", "device_id", "slow_seconds"}


@dataclass(frozen=True)
class Device:
    """One device's identity and settings (from its node config or derived from the fleet)."""

    device_id: str
    partition_id: int
    num_partitions: int
    tasks: tuple[str, ...]
    budget: Budget
    device_class: str
    data: DataSpec
    priorities: dict[str, float] = field(default_factory=dict)
    misbehave: str = ""
    store_root: str = ""
    store_shared: bool = False  # store_root is the fleet's (simulation): the device keeps its models in a subdir
    store_keep: int = 3  # models kept on the device (the active one and the previous ones)
    slow_seconds: float = 30.0  # misbehave=slow: how long the device takes to answer the score query

    def profile(self, samples: int) -> TaskProfile:
        """The TaskProfile this device sends: every scenes-like sample carries every task's labels."""
        tasks = self.tasks + ("bogus",) if self.misbehave == "bad-profile" else self.tasks
        return TaskProfile(
            device_id=self.device_id,
            tasks=tasks,
            budget=self.budget,
            device_class=self.device_class,
            task_priority=dict(self.priorities),
            samples_per_task={t: int(samples) for t in tasks},
        )


def assign(fleet: FleetSpec, partition_id: int, num_partitions: int) -> Device:
    """The device a simulated node with `partition_id` plays: a pure function of the fleet and the id."""
    rng = np.random.default_rng([fleet.seed, 7919, partition_id])
    classes = fleet.classes
    weights = np.array([c.weight for c in classes], dtype=float)
    cls = classes[int(rng.choice(len(classes), p=weights / weights.sum()))]
    subsets = fleet.all_subsets()
    sw = np.array([w for _, w in subsets], dtype=float)
    tasks = subsets[int(rng.choice(len(subsets), p=sw / sw.sum()))][0]
    over = fleet.overrides.get(partition_id, {})
    if "class" in over:
        named = {c.name: c for c in classes}
        if over["class"] not in named:
            raise ValueError(f"fleet: device {partition_id}: unknown class {over['class']!r}")
        cls = named[over["class"]]
    kind = str(over.get("budget_kind", cls.budget_kind))
    return Device(
        device_id=str(over.get("device_id", f"device-{partition_id:04d}")),
        partition_id=partition_id,
        num_partitions=num_partitions,
        tasks=tuple(over.get("tasks", tasks)),
        budget=Budget(kind, float(over.get("budget", cls.budget))),
        device_class=cls.name,
        data=fleet.data,
        priorities={str(k): float(v) for k, v in over.get("priority", {}).items()},
        misbehave=str(over.get("misbehave", "")),
        slow_seconds=float(over.get("slow_seconds", 30.0)),
        store_root=fleet.store_root,
        store_shared=True,
    )


# ------------------------------------------------------------------------------------ node config


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def _parse_budget(value: Any) -> Budget:
    text = str(value)
    kind, _, number = text.rpartition("=") if "=" in text else ("params", "", text)
    return Budget(kind, float(number))


def _parse_priorities(value: Any) -> dict[str, float]:
    out = {}
    for item in _split_list(value):
        task, _, weight = item.partition("=")
        out[task.strip()] = float(weight)
    return out


def device_from_node_config(node_config: Mapping[str, Any], fleet: FleetSpec | None) -> Device:
    """A device from its node config; keys missing there come from the fleet (simulation)."""
    pid = int(node_config.get("partition-id", 0))
    parts = int(node_config.get("num-partitions", 1))
    if "tasks" not in node_config:
        if fleet is None:
            raise ValueError("device: node config names no tasks and the server sent no fleet description")
        device = assign(fleet, pid, parts)
    else:
        data = fleet.data if fleet is not None else DataSpec()
        device = Device(
            device_id=str(node_config.get("device-id", f"device-{pid:04d}")),
            partition_id=pid,
            num_partitions=parts,
            tasks=_split_list(node_config["tasks"]),
            budget=_parse_budget(node_config.get("budget", 1.0)),
            device_class=str(node_config.get("device-class", "")),
            data=data,
            priorities=_parse_priorities(node_config.get("priority", "")),
            store_root=fleet.store_root if fleet is not None else "",
            store_shared=fleet is not None,
        )
    data_fields = {
        "dataset": ("dataset", str), "data-seed": ("seed", int), "samples-per-device": ("samples_per_device", int),
        "partition": ("partition", str), "alpha": ("alpha", float),
    }
    changes = {name: kind(node_config[key]) for key, (name, kind) in data_fields.items() if key in node_config}
    if changes:
        device = replace(device, data=replace(device.data, **changes))
    if "store-dir" in node_config:
        device = replace(device, store_root=str(node_config["store-dir"]), store_shared=False)
    if "store-keep" in node_config:
        keep = int(node_config["store-keep"])
        if keep < 1:
            raise ValueError(f"device: store-keep must be >= 1, got {keep}")
        device = replace(device, store_keep=keep)
    if "misbehave" in node_config:
        device = replace(device, misbehave=str(node_config["misbehave"]))
    if "slow-seconds" in node_config:
        device = replace(device, slow_seconds=float(node_config["slow-seconds"]))
    if device.misbehave not in MISBEHAVIOURS:
        raise ValueError(f"device: unknown misbehave {device.misbehave!r}")
    return device


__all__ = ["DROPOUT_PHASES", "DataSpec", "Device", "DeviceClass", "FleetSpec", "MISBEHAVIOURS", "assign", "device_from_node_config"]
