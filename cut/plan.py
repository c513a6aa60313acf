"""PruningPlan: which channels each channel group keeps, for one base model and task subset.

A plan is pure data (JSON round-trip, content hash), so the server can cache compact models by plan
hash and a device can check that what it received was built from the model and tasks it asked for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PruningPlan:
    base_model_sha256: str
    tasks: tuple[str, ...]
    keep: dict[str, tuple[int, ...]]  # group name -> kept channel indices, sorted ascending
    group_sizes: dict[str, int]  # group name -> channels before pruning
    budget_kind: str = "params"  # "params" | "macs"
    budget_value: float = 1.0  # fraction of the decomposed model that may remain
    method: str = "cut"
    achieved: dict[str, float] = field(default_factory=dict)  # e.g. params_ratio, macs_ratio
    version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        if set(self.keep) != set(self.group_sizes):
            raise ValueError("plan: keep and group_sizes name different groups")
        for name, idxs in self.keep.items():
            size = self.group_sizes[name]
            if not idxs:
                raise ValueError(f"plan: group {name!r} keeps no channel")
            if list(idxs) != sorted(set(idxs)) or idxs[0] < 0 or idxs[-1] >= size:
                raise ValueError(f"plan: group {name!r} indices must be sorted, unique and in [0, {size})")

    @property
    def plan_hash(self) -> str:
        """sha256 over what determines the compact model: base model, tasks and kept channels."""
        core = {
            "base_model_sha256": self.base_model_sha256,
            "tasks": list(self.tasks),
            "keep": {k: list(v) for k, v in sorted(self.keep.items())},
            "version": self.version,
        }
        return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def pruned_groups(self) -> dict[str, list[int]]:
        """group name -> channel indices to remove (only groups that lose channels)."""
        out = {}
        for name, idxs in self.keep.items():
            kept = set(idxs)
            removed = [i for i in range(self.group_sizes[name]) if i not in kept]
            if removed:
                out[name] = removed
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "base_model_sha256": self.base_model_sha256,
            "tasks": list(self.tasks),
            "budget_kind": self.budget_kind,
            "budget_value": self.budget_value,
            "method": self.method,
            "achieved": dict(self.achieved),
            "group_sizes": dict(self.group_sizes),
            "keep": {k: list(v) for k, v in self.keep.items()},
            "plan_hash": self.plan_hash,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruningPlan:
        if d.get("version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"plan format version {d.get('version')!r} is not supported (expected {PLAN_FORMAT_VERSION})")
        plan = cls(
            base_model_sha256=str(d["base_model_sha256"]),
            tasks=tuple(d["tasks"]),
            keep={str(k): tuple(int(i) for i in v) for k, v in d["keep"].items()},
            group_sizes={str(k): int(v) for k, v in d["group_sizes"].items()},
            budget_kind=str(d.get("budget_kind", "params")),
            budget_value=float(d.get("budget_value", 1.0)),
            method=str(d.get("method", "cut")),
            achieved={str(k): float(v) for k, v in d.get("achieved", {}).items()},
            version=int(d["version"]),
        )
        if "plan_hash" in d and d["plan_hash"] != plan.plan_hash:
            raise ValueError("plan: stored plan_hash does not match its content")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))
