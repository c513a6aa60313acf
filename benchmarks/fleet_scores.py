"""A simulated fleet's honest scores, computed once with the real device code and cached; then the server's
real aggregation and planning, and a shared one-shot evaluation of every distinct plan.

Shared by benchmarks/bench_privacy.py and benchmarks/bench_attack.py. Nothing here starts Flower: what a
federation run does per device and on the server is called directly, in one process:

- device: `simulations.fleet.assign` (who the device is), `client.data.local_data` (its private samples),
  `client.scoring.local_scores` + `mean_one` (its per-task scores on its decomposed base model, with the
  seed the ClientApp uses), and later `client.scoring.privatise` and the float16 wire round trip;
- server: `server.aggregate.aggregate` / `personalise` and `server.planning.PlanBook.plan`, keyed exactly as
  `server.app.plan_devices` keys shared plans.

Evaluation differs from a federation run on purpose: every distinct plan's compact model is evaluated on
one shared held-out `scenes` test set (instead of each device's handful of held-out samples, too few to
compare configurations), after BatchNorm re-estimation on a shared calibration set of 4 batches of 16
(the devices re-estimate on 4 batches of 16 of their own samples). A device's delta_m is its plan's delta_m
against the dense decomposed model of its task subset on that test set. Results are cached on disk by
plan hash, so a configuration that reproduces an earlier plan costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from client import base as device_base  # noqa: E402
from client.data import local_data  # noqa: E402
from client.device import Device  # noqa: E402
from client.scoring import local_scores, mean_one, privatise  # noqa: E402
from cut.budget import BudgetOptions  # noqa: E402
from cut.compact import compact_model, recalibrate_batchnorm  # noqa: E402
from cut.data import get_dataset  # noqa: E402
from cut.importance import take_batches  # noqa: E402
from cut.messages import PrivacySettings, ScoringRequest  # noqa: E402
from cut.plan import PruningPlan  # noqa: E402
from cut.train import evaluate, make_loader, multitask_delta  # noqa: E402
from server.aggregate import TaskScores, aggregate, personalise  # noqa: E402
from server.planning import BaseModel, PlanBook  # noqa: E402
from server.settings import Settings  # noqa: E402
from simulations.fleet import assign  # noqa: E402
from simulations.scenario import load_scenario, resolve  # noqa: E402

CACHE = ROOT / "runs" / "fleet-scores"


@dataclass
class FleetDevice:
    """One simulated device: who it is, its honest normalised scores, its aggregation weight per task."""

    device: Device
    tasks: tuple[str, ...]  # canonical order (the base model's head order), as the server keeps them
    scores: TaskScores  # honest, normalised (mean 1 per task), float32, before privatise
    weights: dict[str, float]  # samples used, capped at the samples declared (server.app.sample_weights)

    @property
    def pid(self) -> int:
        return self.device.partition_id

    @property
    def plan_key(self) -> tuple:
        """server.app.plan_devices' key for shared plans (personalisation 0)."""
        d = self.device
        return (self.tasks, d.budget.kind, d.budget.value, tuple(sorted(d.priorities.items())))


@dataclass
class Fleet:
    settings: Settings
    base: BaseModel
    devices: list[FleetDevice]
    seconds_scoring: float = 0.0

    def holders(self, task: str) -> list[FleetDevice]:
        return [d for d in self.devices if task in d.tasks]

    @property
    def budgets(self) -> list[float]:
        return sorted({d.device.budget.value for d in self.devices})


def load_fleet(scenario: str = "default", devices: int = 100, base_model: str | Path = "runs/pretrained-scenes",
               cache_dir: Path = CACHE, threads: int = 1, quiet: bool = False) -> Fleet:
    """The scenario's fleet of `devices` devices with their honest scores (computed once, then cached)."""
    torch.set_num_threads(threads)
    loaded = load_scenario(scenario, devices=devices, base_model_dir=base_model)
    base = BaseModel.load(loaded.settings.base_model_dir)
    loaded = resolve(loaded, base.card)
    settings, fleet_spec = loaded.settings, dataclasses.replace(loaded.fleet, store_root="")
    s = settings.scoring
    spec = {"scenario": settings.name, "devices": devices, "base": base.sha256, "criterion": s.criterion,
            "num_batches": s.num_batches, "batch_size": s.batch_size, "seed": settings.seed,
            "data": json.dumps(settings.data.__dict__, sort_keys=True, default=str),
            "fleet": json.dumps(dataclasses.asdict(fleet_spec), sort_keys=True, default=str)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"honest-{settings.name}-{devices}-{key}.npz"
    fleet_devices = [assign(fleet_spec, pid, devices) for pid in range(devices)]
    if path.is_file():
        stored = np.load(path)
        meta = json.loads(str(stored["__meta__"]))
        out = []
        for device, m in zip(fleet_devices, meta["devices"], strict=True):
            tasks = tuple(m["tasks"])
            scores = {t: {g: stored[f"{device.partition_id}/{t}/{g}"] for g in m["groups"][t]} for t in tasks}
            out.append(FleetDevice(device, tasks, scores, {t: float(w) for t, w in m["weights"].items()}))
        return Fleet(settings, base, out, float(meta["seconds"]))
    start = time.perf_counter()
    out = []
    base_dir = str(base.directory.resolve())
    for i, device in enumerate(fleet_devices):
        tasks = base.canonical(device.tasks)
        request = ScoringRequest(base.model_id, base.sha256, tasks, s.criterion, s.num_batches, s.batch_size)
        model = device_base.decomposed(base.sha256, tasks, base_dir)
        data = local_data(device)
        seed = settings.seed * 100_003 + device.partition_id  # client.app._seed
        scores = mean_one(local_scores(model, data, request, seed))
        used = min(s.num_batches * s.batch_size, data.num_train)
        weights = {t: float(min(used, data.num_train)) for t in tasks}
        out.append(FleetDevice(device, tasks, scores, weights))
        if not quiet and (i + 1) % max(1, devices // 10) == 0:
            print(f"scored {i + 1}/{devices} devices", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    if not quiet:
        print(f"scored {devices} devices in {seconds:.0f} s (cached in {path})", file=sys.stderr)
    arrays = {f"{d.pid}/{t}/{g}": v for d in out for t, groups in d.scores.items() for g, v in groups.items()}
    meta = {"spec": spec, "seconds": seconds,
            "devices": [{"tasks": list(d.tasks), "weights": d.weights,
                         "groups": {t: list(d.scores[t]) for t in d.tasks}} for d in out]}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **arrays)
    return Fleet(settings, base, out, seconds)


# ------------------------------------------------------------------------------------ what leaves devices


def wire(scores: TaskScores, dtype: str = "float16") -> TaskScores:
    """The float16 (or float32) round trip of cut.wire: what the server decodes."""
    return {t: {g: np.asarray(v, dtype=dtype).astype(np.float32) for g, v in groups.items()}
            for t, groups in scores.items()}


def private_reports(fleet: Fleet, clip_norm: float, noise_multiplier: float, noise_seed: int) -> list[TaskScores]:
    """Every device's report after the real `client.scoring.privatise` and the wire (noise reproducible
    per (noise_seed, device) here; devices draw fresh randomness in a federation)."""
    privacy = PrivacySettings(clip_norm=clip_norm, noise_multiplier=noise_multiplier)
    return [wire(privatise(d.scores, privacy, np.random.default_rng([noise_seed, d.pid])), fleet.settings.scoring.dtype)
            for d in fleet.devices]


def flat(groups: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in groups.values()])


def unflat(vector: np.ndarray, like: Mapping[str, np.ndarray], dtype=np.float32) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for g, v in like.items():
        out[g] = vector[start:start + len(v)].astype(dtype)
        start += len(v)
    return out


# ------------------------------------------------------------------------------------------- the server


def options_of(settings: Settings) -> BudgetOptions:
    p = settings.planning
    return BudgetOptions(p.min_channels, p.min_fraction, p.round_to)


def plan_fleet(fleet: Fleet, reports: Sequence[TaskScores] | None = None, rule: str = "weighted-mean",
               aggregated: TaskScores | None = None, **robust) -> dict[int, PruningPlan]:
    """partition id -> plan, as server.app.plan_devices makes them (personalisation 0): aggregate per task
    (`rule`, and `robust` keyword arguments of server.aggregate.aggregate), then one plan per key."""
    settings = fleet.settings
    book = PlanBook(fleet.base, options_of(settings), settings.planning.normalise)
    if aggregated is None:
        assert reports is not None
        aggregated = aggregate([(r, d.weights) for r, d in zip(reports, fleet.devices, strict=True)], rule, **robust)
    plans = {}
    for d in fleet.devices:
        per_task = personalise(aggregated, None, d.tasks, 0.0)
        plans[d.pid] = book.plan(d.tasks, d.device.budget, per_task, d.device.priorities, d.plan_key)
    return plans


def kept_change(plans: Mapping[int, PruningPlan], reference: Mapping[int, PruningPlan], fleet: Fleet
                ) -> dict[float, float]:
    """budget -> share of the reference plans' kept channels that the plans no longer keep (over distinct
    plan keys of that budget; every key counts once)."""
    lost: dict[float, int] = {}
    kept: dict[float, int] = {}
    seen = set()
    for d in fleet.devices:
        if d.plan_key in seen:
            continue
        seen.add(d.plan_key)
        ref, got = reference[d.pid], plans[d.pid]
        b = d.device.budget.value
        for g, channels in ref.keep.items():
            kept[b] = kept.get(b, 0) + len(channels)
            lost[b] = lost.get(b, 0) + len(set(channels) - set(got.keep.get(g, ())))
    return {b: lost[b] / kept[b] for b in sorted(kept)}


# ------------------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluator:
    """One-shot metrics of compact models on a shared test set, cached by plan hash (memory and disk)."""

    fleet: Fleet
    test_samples: int = 200
    calibration_batches: int = 4
    calibration_batch_size: int = 16
    cache_dir: Path = CACHE
    _test: list = field(default_factory=list)
    _calibration: list = field(default_factory=list)
    _dense: dict = field(default_factory=dict)
    _results: dict = field(default_factory=dict)
    evaluated: int = 0

    def __post_init__(self) -> None:
        base = self.fleet.base
        size = int(base.card.get("dataset_kwargs", {}).get("size", 64))
        test = get_dataset("scenes", "test", num_samples=self.test_samples, size=size, seed=0)
        self._test = list(make_loader(test, 50))
        calib = get_dataset("scenes", "train", num_samples=self.calibration_batches * self.calibration_batch_size,
                            size=size, seed=7)
        self._calibration = take_batches(make_loader(calib, self.calibration_batch_size),
                                         self.calibration_batches)
        self._path = self.cache_dir / f"evals-{base.sha256[:12]}-test{self.test_samples}.json"
        if self._path.is_file():
            self._results = json.loads(self._path.read_text())

    def dense(self, tasks: tuple[str, ...]) -> dict:
        key = "dense:" + ",".join(tasks)
        if key not in self._results:
            self._results[key] = evaluate(self.fleet.base.decomposed(tasks), self._test, list(tasks))
        return self._results[key]

    def metrics(self, plan: PruningPlan) -> dict:
        if plan.plan_hash not in self._results:
            dense = self.fleet.base.decomposed(plan.tasks)
            compact = recalibrate_batchnorm(compact_model(dense, plan), self._calibration)
            self._results[plan.plan_hash] = evaluate(compact, self._test, list(plan.tasks))
            self.evaluated += 1
        return self._results[plan.plan_hash]

    def delta(self, plan: PruningPlan) -> float:
        return multitask_delta(self.fleet.base.model, self.metrics(plan), self.dense(plan.tasks))

    def fleet_delta(self, plans: Mapping[int, PruningPlan]) -> dict[str, float]:
        """Mean delta_m over devices ('mean') and per budget ('0.3', ...), each device its plan's delta_m."""
        per_budget: dict[float, list[float]] = {}
        for d in self.fleet.devices:
            per_budget.setdefault(d.device.budget.value, []).append(self.delta(plans[d.pid]))
        out = {"mean": float(np.mean([v for vs in per_budget.values() for v in vs]))}
        out.update({f"{b:g}": float(np.mean(vs)) for b, vs in sorted(per_budget.items())})
        return out

    def save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._path.write_text(json.dumps(self._results))


def timed(label: str, fn: Callable[[], object]) -> object:
    start = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return out


__all__ = ["Evaluator", "Fleet", "FleetDevice", "flat", "kept_change", "load_fleet",
           "plan_fleet", "private_reports", "unflat", "wire"]
