"""What the server keeps in its run directory so that a restarted server resumes instead of starting over.

    OUT/state/manifest.json           base model sha256, scenario, last finetune round completed
    OUT/state/identities.json         device id -> fingerprint of the node key that held it (server.identity)
    OUT/state/reports/<device>.npz    each device's ImportanceReport as it arrived (wire header + arrays)
    OUT/state/aggregated.npz          the per-task aggregated scores the plans were made from, and the
                                      devices they came from (one file: both change together)
    OUT/state/plans/<plan hash>.json  each plan (PruningPlan JSON; for inspection: a resumed run derives
                                      the same plans again from the kept aggregate)
    OUT/state/recovered/<hash>.npz    each plan's weights after server-side recovery (server.recovery)
    OUT/state/builds/<plan hash>.npz  each plan's current compact weights (after the last finetune round)
    OUT/state/latency/<device>.json   each model a device with a latency budget timed (plan hash, ms, dense
                                      ms), in order: a resumed run plans it with those in its calibration

Scoring is the expensive, privacy-relevant step of a device, so a resumed run asks only devices without a
kept report to score. A kept report is decoded and validated exactly like a fresh one (same base model,
same tasks, same group sizes), so nothing that would have been rejected slips in through the disk.
Everything is written atomically (temporary file, then rename) and read with `allow_pickle=False`.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cut.checkpoint import atomic_write
from cut.plan import PruningPlan

_HEADER = "__header__"
_CONTRIBUTORS = "__contributors__"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _flat(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{task}|{group}": np.asarray(vec) for task, groups in scores.items() for group, vec in groups.items()}


def _nested(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, vec in arrays.items():
        task, _, group = key.partition("|")
        out.setdefault(task, {})[group] = vec
    return out


class RunState:
    """The server's persisted progress for one run directory and one base model."""

    def __init__(self, out_dir: str | Path, base_sha256: str, scenario: str, resume: bool) -> None:
        self.root = Path(out_dir) / "state"
        self.base_sha256, self.scenario = base_sha256, scenario
        kept = self._manifest() if resume else None
        if kept is not None and kept.get("base_model_sha256") != base_sha256:
            raise ValueError(f"cannot resume from {self.root}: it was made with base model "
                             f"{str(kept.get('base_model_sha256'))[:12]}..., not {base_sha256[:12]}...")
        if kept is None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.resumed = kept is not None  # there was a run to continue
        self.manifest: dict[str, Any] = kept or {"base_model_sha256": base_sha256, "scenario": scenario,
                                                 "finetune_round": 0}
        for sub in ("reports", "plans", "recovered", "builds", "latency"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_manifest()

    # ------------------------------------------------------------------------------------- manifest

    def _manifest(self) -> dict[str, Any] | None:
        path = self.root / "manifest.json"
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot resume: {path} is damaged ({e.msg})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("finetune_round"), int):
            raise ValueError(f"cannot resume: {path} is not a cut-fl run manifest")
        return manifest

    def _write_manifest(self) -> None:
        atomic_write(self.root / "manifest.json", json.dumps(self.manifest, indent=2).encode())

    @property
    def finetune_round(self) -> int:
        return int(self.manifest.get("finetune_round", 0))

    # ----------------------------------------------------------------------------------- identities

    def keep_identities(self, bindings: dict[str, str]) -> None:
        """Device id -> key fingerprint of the node that held it: a resumed run gives the id to that key only."""
        atomic_write(self.root / "identities.json", json.dumps(dict(sorted(bindings.items())), indent=2).encode())

    def kept_identities(self) -> dict[str, str]:
        """The bindings of the run being resumed ({} for a fresh run). A damaged file is an error, not an
        empty list: losing it would let any node claim any restored device id."""
        path = self.root / "identities.json"
        if not self.resumed or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot resume: {path} is damaged ({e.msg})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"cannot resume: {path} is not a map of device ids to key fingerprints")
        return data

    # -------------------------------------------------------------------------------------- reports

    def _report_path(self, device_id: str) -> Path:
        return self.root / "reports" / f"{_SAFE.sub('_', device_id)}.npz"

    def keep_report(self, device_id: str, header: bytes, arrays: dict[str, np.ndarray]) -> None:
        """A device's report as it arrived (validated by the caller), for a resumed run."""
        data = {_HEADER: np.frombuffer(header, dtype=np.uint8), **arrays}
        atomic_write(self._report_path(device_id), _npz_bytes(data))

    def kept_report(self, device_id: str) -> tuple[bytes, dict[str, np.ndarray]] | None:
        """(header, arrays) of a kept report, or None (also when the file is unreadable: score again)."""
        path = self._report_path(device_id)
        if not path.is_file():
            return None
        try:
            arrays = _read_npz(path)
        except (OSError, ValueError):
            return None
        header = arrays.pop(_HEADER, None)
        return None if header is None else (header.tobytes(), arrays)

    def kept_devices(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "reports").glob("*.npz"))

    # -------------------------------------------------------------------------- aggregate and plans

    def keep_aggregated(self, scores: dict[str, dict[str, np.ndarray]], contributors: list[str]) -> None:
        data = {_CONTRIBUTORS: np.array(sorted(contributors), dtype=str), **_flat(scores)}
        atomic_write(self.root / "aggregated.npz", _npz_bytes(data))

    def has_aggregated(self, contributors: list[str]) -> bool:
        """Whether the kept aggregate was made from exactly these devices (reads only that list)."""
        path = self.root / "aggregated.npz"
        if not path.is_file():
            return False
        with np.load(path, allow_pickle=False) as data:
            return _CONTRIBUTORS in data.files and data[_CONTRIBUTORS].tolist() == sorted(contributors)

    def kept_aggregated(self, contributors: list[str]) -> dict[str, dict[str, np.ndarray]] | None:
        """The kept aggregate if it was made from exactly these devices' reports."""
        if not self.has_aggregated(contributors):
            return None
        arrays = _read_npz(self.root / "aggregated.npz")
        del arrays[_CONTRIBUTORS]
        return _nested(arrays)

    def keep_plan(self, plan: PruningPlan) -> None:
        path = self.root / "plans" / f"{plan.plan_hash}.json"
        if not path.is_file():
            atomic_write(path, json.dumps(plan.to_dict()).encode())

    def kept_plan(self, plan_hash: str) -> PruningPlan | None:
        """A kept plan (None: not kept, or the file is unreadable or not the plan of that hash)."""
        path = self.root / "plans" / f"{_SAFE.sub('_', plan_hash)}.json"
        try:
            plan = PruningPlan.from_json(path.read_text()) if path.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return plan if plan is not None and plan.plan_hash == plan_hash else None

    def keep_weights(self, plan_hash: str, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(self.root / "builds" / f"{plan_hash}.npz", _npz_bytes(arrays))

    def kept_weights(self, plan_hash: str) -> dict[str, np.ndarray] | None:
        path = self.root / "builds" / f"{plan_hash}.npz"
        return _read_npz(path) if path.is_file() else None

    def keep_recovered(self, plan_hash: str, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(self.root / "recovered" / f"{plan_hash}.npz", _npz_bytes(arrays))

    def kept_recovered(self, plan_hash: str) -> dict[str, np.ndarray] | None:
        """A plan's recovered weights (None: not recovered yet, or the file is unreadable: recover again)."""
        path = self.root / "recovered" / f"{plan_hash}.npz"
        try:
            return _read_npz(path) if path.is_file() else None
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------------------- latency checks

    def _timings_path(self, device_id: str) -> Path:
        return self.root / "latency" / f"{_SAFE.sub('_', device_id)}.json"

    def keep_latency_timings(self, device_id: str, timings: list[tuple[str, float, float]]) -> None:
        """(plan hash, latency_ms, latency_dense_ms) of each model a device with a latency budget timed, in order
        (the measurements the server's latency checks folded into its table)."""
        atomic_write(self._timings_path(device_id), json.dumps([list(t) for t in timings]).encode())

    def kept_latency_timings(self, device_id: str) -> list[tuple[str, float, float]]:
        """The kept timings of a device ([] for a fresh run, none kept, or a damaged file: the device is then
        checked again from its first plan, as in a fresh run)."""
        path = self._timings_path(device_id)
        if not self.resumed or not path.is_file():
            return []
        try:
            data = json.loads(path.read_text())
            timings = [(str(h), float(ms), float(dense)) for h, ms, dense in data]
        except (OSError, ValueError, TypeError):
            return []
        ok = all(0 < ms < 1e7 and 0 < dense < 1e7 for _, ms, dense in timings)
        return timings if ok else []

    def finished_round(self, round_: int) -> None:
        self.manifest["finetune_round"] = round_
        self._write_manifest()


__all__ = ["RunState"]
