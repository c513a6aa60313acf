"""A scenario for the simulation: the server's settings and the simulated fleet, from one TOML file.

`load_scenario` reads the file once (server.settings declares and validates every section), builds the
fleet from its `[fleet]` section and applies the command line's `[scoring]` overrides; a target epsilon
becomes the noise multiplier that covers the device holding the most tasks the fleet allows.
`resolve` completes both from the base model's card before the run starts, so the server and the
simulated devices see the same data description.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.privacy import noise_for_epsilon
from server.settings import FleetSection, Settings, data_for_model, read_scenario, settings_from
from simulations.fleet import DeviceClass, FleetSpec

DEFAULT_CLASSES = (DeviceClass("micro", 0.3), DeviceClass("mobile", 0.5), DeviceClass("edge-gpu", 0.7))


@dataclass(frozen=True)
class Scenario:
    settings: Settings
    fleet: FleetSpec


def load_scenario(scenario: str | Path = "default", *, devices: int | None = None, out_dir: str | Path | None = None,
                  base_model_dir: str | Path | None = None, epsilon: float | None = None,
                  **scoring: Any) -> Scenario:
    """Read a scenario (path or shipped name) and apply the run's overrides.

    `scoring`: [scoring] keys that replace the file's (clip_norm, noise_multiplier, aggregation,
    trim_fraction, server_clip; None = keep). `epsilon` (instead of a noise multiplier) picks the smallest
    noise multiplier whose reports spend at most epsilon at scoring.dp_delta (server.privacy)."""
    path, parsed = read_scenario(scenario)
    if devices is not None and devices < 1:
        raise ValueError(f"scenario {path}: devices must be >= 1, got {devices}")
    settings = settings_from(path, parsed, devices=devices, out_dir=out_dir, base_model_dir=base_model_dir)
    fleet = fleet_of(parsed.fleet, settings)
    changes = {k: v for k, v in scoring.items() if v is not None}
    if epsilon is not None:
        if changes.get("noise_multiplier") is not None:
            raise ValueError("give a noise multiplier or a target epsilon, not both")
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"target epsilon must be a finite number > 0, got {epsilon!r}")
        clip = changes.get("clip_norm", settings.scoring.clip_norm)
        if clip <= 0:
            raise ValueError("a target epsilon needs scoring.clip_norm > 0 (the sensitivity the noise is scaled to)")
        changes["noise_multiplier"] = noise_for_epsilon(float(epsilon), fleet_max_tasks(fleet),
                                                        settings.scoring.dp_delta)
    if changes:
        settings = settings.with_scoring(**changes)
    return Scenario(settings, fleet)


def fleet_of(section: FleetSection, settings: Settings) -> FleetSpec:
    """The fleet of a scenario's [fleet] section (the scenario's data and seed)."""
    classes = tuple(DeviceClass(**c.model_dump()) for c in section.classes) or DEFAULT_CLASSES
    overrides = {}
    for entry in section.devices:
        if "id" not in entry:
            raise ValueError("scenario [[fleet.devices]]: every entry needs an id (partition id)")
        overrides[int(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
    return FleetSpec(tasks=tuple(section.tasks), classes=classes,
                     subsets=tuple((tuple(s.tasks), float(s.weight)) for s in section.subsets),
                     overrides=overrides, data=settings.data, seed=settings.seed)


def fleet_max_tasks(fleet: FleetSpec) -> int:
    """The most tasks one device of the fleet can hold: the largest task subset it draws from, or a
    per-device override. Noise calibrated for it covers every device."""
    sizes = [len(tasks) for tasks, weight in fleet.all_subsets() if weight > 0]
    sizes += [len(o["tasks"]) for o in fleet.overrides.values() if "tasks" in o]
    return max(sizes, default=len(fleet.tasks))


def resolve(scenario: Scenario, card: dict[str, Any]) -> Scenario:
    """Both halves completed from the base model's card (server.settings.data_for_model); simulated devices
    keep their models under out_dir/store."""
    settings = scenario.settings
    data = data_for_model(settings.data, card, settings.name)
    store_root = scenario.fleet.store_root or str((settings.out_dir / "store").resolve())
    return Scenario(dataclasses.replace(settings, data=data),
                    dataclasses.replace(scenario.fleet, data=data, store_root=store_root))


__all__ = ["Scenario", "fleet_max_tasks", "fleet_of", "load_scenario", "resolve"]
