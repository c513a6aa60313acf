"""Who a device is: its tasks, budget, class, data partition and local store, and its TaskProfile.

A real device knows this about itself and is started with it (`flower-supernode --node-config
"device-id='cam-7' tasks='seg,depth' budget=0.5 device-class='board' partition-id=3 num-partitions=20"`;
a latency budget: `budget='latency=5ms'` or `budget='latency=0.5'`, timed on `latency-threads` threads;
a memory budget: `budget='memory=3MB'` or `budget='memory=0.5'`, sized by the server from the model).
What data the base model expects (dataset, image size) comes with the server's profile query
(protocol.phases.ProfileConfig); the node config overrides any of it. A simulated device is assigned its
identity by simulations.fleet instead; nothing here knows about simulation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cut.memory import parse_memory_budget
from cut.messages import Budget, TaskProfile
from protocol.phases import DataSpec


@dataclass(frozen=True)
class Device:
    """One device's identity and settings."""

    device_id: str
    partition_id: int
    num_partitions: int
    tasks: tuple[str, ...]
    budget: Budget
    device_class: str
    data: DataSpec
    priorities: dict[str, float] = field(default_factory=dict)
    store_root: str = ""
    store_shared: bool = False  # store_root is shared by several devices: each keeps its models in a subdir
    store_keep: int = 3  # models kept on the device (the active one and the previous ones)
    latency_threads: int = 1  # onnxruntime threads a latency budget is measured with (node config latency-threads)

    def profile(self, samples: int) -> TaskProfile:
        """The TaskProfile this device sends: every scenes-like sample carries every task's labels."""
        return TaskProfile(
            device_id=self.device_id,
            tasks=self.tasks,
            budget=self.budget,
            device_class=self.device_class,
            task_priority=dict(self.priorities),
            samples_per_task={t: int(samples) for t in self.tasks},
        )


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def _parse_budget(value: Any) -> Budget:
    """'0.5', 'params=0.5', 'macs=0.5', 'latency=0.5' (of the dense model's time here), 'latency=5ms',
    'memory=0.5' (of the dense model's memory) or 'memory=3MB' (cut.memory.parse_memory_budget)."""
    text = str(value)
    kind, _, number = text.rpartition("=") if "=" in text else ("params", "", text)
    if kind == "memory":
        try:
            fraction, nbytes = parse_memory_budget(number)
        except ValueError as e:
            raise ValueError(f"device: {e}") from None
        return Budget("memory", fraction, memory_bytes=nbytes)
    if kind == "latency" and number.strip().lower().endswith("ms"):
        return Budget("latency", 1.0, milliseconds=float(number.strip()[:-2]))
    return Budget(kind, float(number))


def _parse_priorities(value: Any) -> dict[str, float]:
    out = {}
    for item in _split_list(value):
        task, _, weight = item.partition("=")
        out[task.strip()] = float(weight)
    return out


DATA_KEYS = {"dataset": ("dataset", str), "data-seed": ("seed", int), "samples-per-device": ("samples_per_device", int),
             "partition": ("partition", str), "alpha": ("alpha", float)}


def device_from_node_config(node_config: Mapping[str, Any], data: DataSpec | None) -> Device:
    """A device from its node config; `data` is what the server said the base model expects."""
    pid = int(node_config.get("partition-id", 0))
    parts = int(node_config.get("num-partitions", 1))
    if "tasks" not in node_config:
        raise ValueError("device: node config names no tasks (start the SuperNode with --node-config \"tasks='...'\")")
    device = Device(
        device_id=str(node_config.get("device-id", f"device-{pid:04d}")),
        partition_id=pid,
        num_partitions=parts,
        tasks=_split_list(node_config["tasks"]),
        budget=_parse_budget(node_config.get("budget", 1.0)),
        device_class=str(node_config.get("device-class", "")),
        data=data if data is not None else DataSpec(),
        priorities=_parse_priorities(node_config.get("priority", "")),
    )
    return with_node_overrides(device, node_config)


def with_node_overrides(device: Device, node_config: Mapping[str, Any]) -> Device:
    """The node config's data and store keys applied to a device."""
    changes = {name: kind(node_config[key]) for key, (name, kind) in DATA_KEYS.items() if key in node_config}
    if changes:
        device = replace(device, data=replace(device.data, **changes))
    if "store-dir" in node_config:
        device = replace(device, store_root=str(node_config["store-dir"]), store_shared=False)
    if "latency-threads" in node_config:
        threads = int(node_config["latency-threads"])
        if threads < 1:
            raise ValueError(f"device: latency-threads must be >= 1, got {threads}")
        device = replace(device, latency_threads=threads)
    if "store-keep" in node_config:
        keep = int(node_config["store-keep"])
        if keep < 1:
            raise ValueError(f"device: store-keep must be >= 1, got {keep}")
        device = replace(device, store_keep=keep)
    return device


__all__ = ["DATA_KEYS", "Device", "device_from_node_config", "with_node_overrides"]
