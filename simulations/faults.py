"""Fault injection for simulated devices: hooks (client.hooks) that make a device of the fleet misbehave.

A scenario names misbehaving devices in `[[fleet.devices]]` (`misbehave = "nan"`, see
simulations.fleet.MISBEHAVIOURS); the simulation runner builds its ClientApp with `FaultInjector(fleet)`,
so the server's validation, exclusions and timeouts are exercised end to end. A real SuperNode runs
`client.app.app`, which has no hooks: it cannot be told to misbehave.

| misbehave         | what the device does                                                          |
|-------------------|-------------------------------------------------------------------------------|
| nan, negative     | plain: one encoded score becomes NaN / -1 (a device that skips validation); secure: the same value in the scores it flattens, which its own check refuses |
| wrong-length      | one encoded score vector loses its last channel                               |
| unknown-task      | its report also scores a task it was not asked for ("bogus")                  |
| bad-profile       | its profile claims a task the model lacks ("bogus")                            |
| crash             | fails while scoring (plain and secure)                                        |
| slow              | answers the score query after `slow_seconds`                                  |
| drop-<phase>      | goes away at deliver, finetune or evaluate (as a SuperNode that lost its connection) |
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from client.device import Device
from client.hooks import DeviceHooks
from simulations.fleet import FleetSpec, misbehaviour


class FaultInjector(DeviceHooks):
    """The fleet's misbehaving devices, by partition id."""

    def __init__(self, fleet: FleetSpec) -> None:
        self.fleet = fleet

    def kind(self, device: Device) -> tuple[str, float]:
        return misbehaviour(self.fleet, device.partition_id)

    def before(self, phase: str, device: Device) -> None:
        kind, _ = self.kind(device)
        if kind == f"drop-{phase}":
            raise ConnectionError(f"device dropped out during {phase} (misbehave={kind})")
        if kind == "crash" and phase in ("score", "secure-score"):
            raise RuntimeError("device crashed while scoring (misbehave=crash)")

    def after(self, phase: str, device: Device) -> None:
        kind, seconds = self.kind(device)
        if kind == "slow" and phase == "score":
            time.sleep(seconds)

    def outgoing(self, what: str, device: Device, payload: Any) -> Any:
        kind, _ = self.kind(device)
        if what == "profile" and kind == "bad-profile":
            tasks = payload.tasks + ("bogus",)
            count = next(iter(payload.samples_per_task.values()), 0)
            return dataclasses.replace(payload, tasks=tasks, samples_per_task={t: count for t in tasks})
        if what == "report" and kind == "unknown-task":
            first = next(iter(payload.scores))
            return dataclasses.replace(payload, scores={**payload.scores, "bogus": payload.scores[first]},
                                       samples_used={**payload.samples_used, "bogus": payload.samples_used[first]})
        if what == "report-arrays" and kind in ("nan", "negative", "wrong-length"):
            return corrupt(payload, kind)
        if what == "secure-scores" and kind in ("nan", "negative"):
            first = next(iter(payload))
            group = next(iter(payload[first]))
            payload[first][group][0] = np.nan if kind == "nan" else -1.0
        return payload


def corrupt(arrays: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """What a faulty device sends: NaNs, a truncated vector or negative scores (after encoding, as a
    device that skips validation would)."""
    if kind not in ("nan", "wrong-length", "negative"):
        return arrays
    arrays = dict(arrays)
    key = sorted(arrays)[0]
    vec = arrays[key].copy()
    if kind == "nan":
        vec[0] = np.nan
    elif kind == "negative":
        vec[0] = -1.0
    else:
        vec = vec[:-1]
    arrays[key] = vec
    return arrays


__all__ = ["FaultInjector", "corrupt"]
