"""Seams where a harness may change what a device does, and the defaults a real device runs (no change).

The production ClientApp calls these at fixed points; only code that builds its own ClientApp in Python
(`client.app.make_client_app(hooks=...)`, as simulations.faults does to inject faults into simulated
devices) can replace them. Nothing a SuperNode is started with (node config, run config) reaches them.

    before(phase, device)           at the start of a phase's work (profile, score, secure-score, deliver,
                                    finetune, evaluate): may raise, as a crashing or vanishing device would
    after(phase, device)            when a phase's work is done, before the reply leaves
    outgoing(what, device, payload) what the device is about to send: "profile" (TaskProfile), "report"
                                    (ImportanceReport), "report-arrays" (encoded score arrays) or
                                    "secure-scores" (the scores it flattens for SecAgg+, before it checks them)
"""

from __future__ import annotations

from typing import Any

from client.device import Device


class DeviceHooks:
    """The defaults: nothing changes."""

    def before(self, phase: str, device: Device) -> None:
        return None

    def after(self, phase: str, device: Device) -> None:
        return None

    def outgoing(self, what: str, device: Device, payload: Any) -> Any:
        return payload


NO_HOOKS = DeviceHooks()

__all__ = ["DeviceHooks", "NO_HOOKS"]
