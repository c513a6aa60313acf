"""A simulated fleet: device classes (budgets), task subsets, per-device overrides, and how a simulated
device derives who it is.

A simulated SuperNode has only Flower's `partition-id` / `num-partitions`; `assign` derives the rest
deterministically from the scenario's fleet (`FleetSpec`), a pure function of (fleet seed, partition id),
so a scenario replays exactly. The simulation runner binds the fleet into the ClientApp it builds
(`simulations.app.make_simulated_client_app`); a real device never sees a fleet.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.device import Device
from cut.messages import Budget
from protocol.phases import DataSpec

# How a test device misbehaves: corrupt reports (nan, wrong-length, unknown-task, negative), fail while
# scoring (crash), claim a task the model lacks (bad-profile), answer the score query after the server's
# timeout (slow: sleeps slow_seconds), or drop out of the federation at a later phase (drop-<phase>: the
# device goes away, and the server gets the error Flower sends for an unavailable node).
DROPOUT_PHASES = ("deliver", "finetune", "evaluate")
MISBEHAVIOURS = ("", "nan", "wrong-length", "unknown-task", "negative", "crash", "bad-profile", "slow",
                 *(f"drop-{phase}" for phase in DROPOUT_PHASES))


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


OVERRIDE_KEYS = {"tasks", "class", "budget", "budget_kind", "priority", "misbehave", "device_id", "slow_seconds"}


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
        store_root=fleet.store_root,
        store_shared=True,
    )


def misbehaviour(fleet: FleetSpec, partition_id: int) -> tuple[str, float]:
    """How the simulated device `partition_id` misbehaves ('' = it does not) and, if slow, for how long."""
    over = fleet.overrides.get(partition_id, {})
    return str(over.get("misbehave", "")), float(over.get("slow_seconds", 30.0))


__all__ = ["DROPOUT_PHASES", "DeviceClass", "FleetSpec", "MISBEHAVIOURS", "OVERRIDE_KEYS", "assign", "misbehaviour"]
