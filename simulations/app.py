"""The ClientApp of a simulated fleet: the production handlers, with identities and faults from the fleet.

`make_simulated_client_app(fleet)` mirrors `server.app.make_server_app(settings)`: the simulation runner
builds both in-process with what the scenario says. Each simulated SuperNode has only Flower's
`partition-id` / `num-partitions`; its device is `simulations.fleet.assign(fleet, partition_id, ...)`,
and a device the scenario marks as misbehaving gets its faults from `simulations.faults.FaultInjector`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp

from client.app import make_client_app
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


__all__ = ["FleetIdentity", "make_simulated_client_app"]
