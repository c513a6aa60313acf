"""What the server knows about each device, phase by phase, and why a device left the federation.

One `DeviceRecord` per node. A device is `ok` until a phase excludes it: `rejected` when what it sent
breaks the contract (a wire ValidationError, a profile the server cannot serve) and `failed` when it did
not answer in time or answered with an error. Excluded devices get no further messages; the others go on.
Each exclusion is also logged (logger "cutfl.server", one WARNING line with node, device, phase, status
and reason), so an operator sees it as it happens, not only in the final report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cut.messages import ImportanceReport, TaskProfile

OK, REJECTED, FAILED = "ok", "rejected", "failed"

log = logging.getLogger("cutfl.server")


@dataclass
class DeviceRecord:
    node_id: int
    device_id: str = ""
    declared_id: str = ""  # what a refused profile claimed (unverified; for the operator only)
    node_key: str = ""  # fingerprint of the public key Flower registered for the node ("" = none; server.identity)
    profile: TaskProfile | None = None
    tasks: tuple[str, ...] = ()  # in the base model's task order
    status: str = OK
    reason: str = ""
    phase: str = ""  # the phase that excluded it
    report: ImportanceReport | None = None
    report_source: str = ""  # "scored" in this run, "resumed" from the run directory, or "secure-sum"
    plan_hash: str = ""
    weights_sha256: str = ""  # the server weights (build version) it adopted last
    held_sha256: str = ""  # the weights it holds (after its local BatchNorm re-estimation)
    achieved: dict[str, float] = field(default_factory=dict)
    metrics_dense: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_compact: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_oneshot: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_delivered: dict[str, dict[str, float]] = field(default_factory=dict)  # when it holds an adaptation
    adapted: bool | None = None  # on-device adaptation: kept (True), refused by its validation (False), off (None)
    sizes: dict[str, float] = field(default_factory=dict)  # params/macs of dense and compact, as measured on the device
    num_examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_scores: int = 0
    bytes_dense: int = 0  # bytes of the dense decomposed model's weights (the download it replaces)
    latency_timings: list[tuple[str, float, float]] = field(default_factory=list)  # (plan hash, ms, dense ms) in its table

    @property
    def ok(self) -> bool:
        return self.status == OK


class Ledger:
    def __init__(self, node_ids: list[int]) -> None:
        self.records = {nid: DeviceRecord(nid) for nid in node_ids}

    def active(self) -> list[DeviceRecord]:
        return [r for r in self.records.values() if r.ok]

    def exclude(self, node_id: int, status: str, phase: str, reason: str) -> None:
        record = self.records[node_id]
        if record.ok:
            record.status, record.phase, record.reason = status, phase, f"{phase}: {reason}"
            who = record.device_id or (f"declared {record.declared_id!r}, unverified" if record.declared_id else "?")
            log.warning("excluded node %s (device %s) in phase %s: %s: %s", node_id, who,
                        phase, status, " ".join(str(reason).split()))

    def __iter__(self):
        return iter(self.records.values())

    def __len__(self) -> int:
        return len(self.records)


__all__ = ["FAILED", "OK", "REJECTED", "DeviceRecord", "Ledger"]
