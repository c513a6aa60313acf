"""The ClientApp of a simulated fleet: the production handlers, with identities and faults from the fleet.

`make_simulated_client_app(fleet)` mirrors `server.app.make_server_app(settings)`: the simulation runner
builds both in-process with what the scenario says. Each simulated SuperNode has only Flower's
`partition-id` / `num-partitions`; its device is `simulations.fleet.assign(fleet, partition_id, ...)`,
and a device the scenario marks as misbehaving gets its faults from `simulations.faults.FaultInjector`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp

from client.app import make_client_app, node_config_device
from client.device import Device, with_node_overrides
from protocol.phases import DataSpec
from simulations.faults import FaultInjector
from simulations.fleet import FleetSpec, assign


class FleetIdentity:
    """Who a simulated node is: the fleet's device for its partition id (node config keys still apply)."""

    def __init__(self, fleet: FleetSpec) -> None:
        self.fleet = fleet

    def __call__(self, context: Context, data: DataSpec | None) -> Device:
        config = context.node_config
        device = assign(self.fleet, int(config.get("partition-id", 0)), int(config.get("num-partitions", 1)))
        return with_node_overrides(device, config)


def make_simulated_client_app(fleet: FleetSpec) -> ClientApp:
    return make_client_app(identify=FleetIdentity(fleet), hooks=FaultInjector(fleet))


class RunConfigIdentity:
    """`flwr run` (pyproject's clientapp): a SuperNode whose node config names its tasks is a real device
    (client.app.node_config_device); one that has only Flower's partition id (a simulated SuperNode of a
    simulation SuperLink) plays that device of the run config's scenario fleet, as `cutfl simulate` would."""

    def __init__(self) -> None:
        self._fleets: dict[tuple, FleetSpec] = {}

    def __call__(self, context: Context, data: DataSpec | None) -> Device:
        if "tasks" in context.node_config or "partition-id" not in context.node_config:
            return node_config_device(context, data)  # a real device (or one told to name its tasks)
        return FleetIdentity(self.fleet(context.run_config))(context, data)

    def fleet(self, run_config) -> FleetSpec:
        """The scenario's fleet, completed from the base model's card like the ServerApp's settings (cached)."""
        from cut.checkpoint import read_card
        from simulations.scenario import load_scenario, resolve

        key = tuple(str(run_config.get(k, "")) for k in ("scenario", "devices", "out-dir", "base-model"))
        if key not in self._fleets:
            devices = int(run_config.get("devices", 0) or 0) or None
            scenario = load_scenario(key[0] or "default", devices=devices, out_dir=key[2] or None,
                                     base_model_dir=key[3] or None)
            self._fleets[key] = resolve(scenario, read_card(scenario.settings.base_model_dir)).fleet
        return self._fleets[key]


# The ClientApp `flwr run .` loads (pyproject.toml [tool.flwr.app.components]); no fault injection.
app = make_client_app(identify=RunConfigIdentity())

__all__ = ["FleetIdentity", "RunConfigIdentity", "app", "make_simulated_client_app"]
