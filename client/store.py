"""The device's model store: verify what the server sends, rebuild it, keep it, load it again.

Weights from the server (a delivered compact model, or a plan's FedAvg result) are accepted only if
(1) the CompactModelSpec decodes and validates, (2) its base model sha256 is the one this device scored,
(3) its tasks are exactly this device's tasks, (4) the arrays hash to the announced sha256 and (5) they fit
the architecture rebuilt from config + plan (no pickled module is ever loaded).

The device may then adapt them locally (BatchNorm statistics re-estimated on its own samples, see
client.app), so what it *holds* can differ from what it was *sent*: the store keeps both hashes. A held
model is written as a normal model directory (`cut.checkpoint`) named by its weights sha256, and the
device's active model is recorded on disk (`ModelStore`), so it survives a restart of the device.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cut.checkpoint import NotAModelDir, atomic_write, load_model, save_model
from cut.compact import PlanMismatch, apply_plan
from cut.messages import CompactModelSpec, ValidationError
from cut.models import MultiTaskModel
from cut.plan import PruningPlan
from cut.wire import arrays_sha256, decode_spec, verify_weights
from protocol.records import arrays_state, build_architecture, state_arrays

_LOADED: OrderedDict[str, MultiTaskModel] = OrderedDict()  # held weights sha256 -> model (this process)
_MAX_LOADED = 32
_REBUILT: dict[str, str] = {}  # server weights sha256 -> plan hash, for models rebuilt in this process


@dataclass(frozen=True)
class StoredModel:
    directory: Path
    weights_sha256: str  # sha256 of the held weight arrays (cut.wire.arrays_sha256)
    plan_hash: str
    source_sha256: str  # sha256 of the server's weights it was made from (equal when not adapted)


def accept_spec(data: bytes, tasks: Collection[str], base_sha256: str) -> CompactModelSpec:
    """Decode a delivered spec and check it is for this device's tasks and base model."""
    spec = decode_spec(data, base_model_sha256=base_sha256)
    if set(spec.tasks) != set(tasks) or len(spec.tasks) != len(tuple(tasks)):
        raise ValidationError(f"CompactModelSpec: plan tasks {list(spec.tasks)} are not this device's {sorted(tasks)}")
    return spec


def rebuild(architecture: Mapping, plan: PruningPlan, arrays: Mapping[str, np.ndarray]) -> MultiTaskModel:
    """Architecture config + plan + weights -> the compact model (eval mode)."""
    model = build_architecture(architecture, "CompactModelSpec")  # bounded, never a raw torch error
    if tuple(model.task_names) != tuple(plan.tasks):
        raise ValidationError(f"CompactModelSpec: architecture heads {model.task_names} differ from the plan's")
    try:
        apply_plan(model, plan)
        model.load_state_dict(arrays_state(arrays), strict=True)
    except PlanMismatch as e:
        raise ValidationError(f"CompactModelSpec: plan does not fit the architecture ({e})") from None
    except (RuntimeError, TypeError) as e:  # TypeError: an array dtype torch cannot hold
        raise ValidationError(f"weights do not fit the compact architecture ({str(e).splitlines()[0]})") from None
    model.eval()
    return model


def receive(data: bytes, arrays: Mapping[str, np.ndarray], tasks: Collection[str],
            base_sha256: str) -> tuple[MultiTaskModel, CompactModelSpec]:
    """train.deliver on the device: accept the spec, verify the weights, rebuild the model.

    The returned model may be shared with other devices of this process: copy it before changing it.
    """
    spec = accept_spec(data, tasks, base_sha256)
    verify_weights(spec, arrays)
    cached = _LOADED.get(spec.weights_sha256)
    if cached is not None and _REBUILT.get(spec.weights_sha256) == spec.plan.plan_hash:
        return cached, spec  # the same verified weights for the same plan, already rebuilt here
    model = rebuild(spec.architecture, spec.plan, arrays)
    _remember(spec.weights_sha256, model)
    _REBUILT[spec.weights_sha256] = spec.plan.plan_hash
    return model, spec


def receive_weights(current: StoredModel, arrays: Mapping[str, np.ndarray],
                    expected_sha256: str) -> tuple[MultiTaskModel, PruningPlan]:
    """New server weights for the plan this device holds (a FedAvg result): verify and rebuild."""
    got = arrays_sha256(arrays)
    if got != expected_sha256:
        raise ValidationError(f"weights sha256 mismatch: got {got[:12]}..., expected {expected_sha256[:12]}...")
    _, card = load_model(current.directory)
    plan = PruningPlan.from_dict(card["plan"])
    return rebuild(card["config"], plan, arrays), plan


class ModelStore:
    """One device's models on disk: content-addressed, written atomically, the last `keep` kept, one active.

        root/models/<weights sha256>/   model.json + weights.pt (cut.checkpoint), renamed into place whole
        root/active.json                the active model and the activation history (newest first)
        root/scored.json                the base model the device last scored (what deliveries must match)

    A model directory appears only complete (written under a temporary name, then renamed), and the active
    pointer is replaced atomically, so a crash at any point leaves the previous active model intact. A
    refused delivery never reaches the store. Models outside the last `keep` activations are deleted; the
    active one never is.
    """

    ACTIVE = "active.json"
    SCORED = "scored.json"

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"model store: keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), int(keep)
        self.models = self.root / "models"

    def put(self, model: MultiTaskModel, plan: PruningPlan, source_sha256: str) -> StoredModel:
        """Write `model` under models/<its weights sha256> (atomic; idempotent); does not activate it."""
        sha = arrays_sha256(state_arrays(model))
        directory = self.models / sha
        if not (directory / "model.json").is_file():
            self.models.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.models, prefix=f".{sha[:12]}."))
            try:
                save_model(tmp, model, {"plan": plan.to_dict(), "arrays_sha256": sha, "source_sha256": source_sha256,
                                        "base_model_sha256": plan.base_model_sha256, "tasks": list(plan.tasks)})
                try:
                    os.rename(tmp, directory)
                except OSError:
                    if not (directory / "model.json").is_file():  # not a concurrent writer of the same weights
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _remember(sha, model)
        return StoredModel(directory, sha, plan.plan_hash, source_sha256)

    def put_active(self, model: MultiTaskModel, plan: PruningPlan, source_sha256: str) -> StoredModel:
        """Keep `model` and make it the active one (what a device does with weights it adopts)."""
        stored = self.put(model, plan, source_sha256)
        self.activate(stored)
        return stored

    def activate(self, stored: StoredModel) -> None:
        """Make `stored` the active model (atomic pointer swap), then drop models beyond the last `keep`."""
        if stored.directory.resolve() != (self.models / stored.weights_sha256).resolve():
            raise ValueError(f"model store: {stored.directory} is not in {self.models}")
        history = [stored.weights_sha256] + [s for s in self.history() if s != stored.weights_sha256]
        pointer = {"weights_sha256": stored.weights_sha256, "plan_hash": stored.plan_hash,
                   "source_sha256": stored.source_sha256, "history": history[:self.keep]}
        atomic_write(self.root / self.ACTIVE, json.dumps(pointer, indent=2).encode())
        self._collect(set(history[:self.keep]))

    def active(self) -> StoredModel | None:
        """The active model, or None when nothing was ever activated here."""
        pointer = self._pointer()
        if pointer is None:
            return None
        sha = pointer["weights_sha256"]
        return StoredModel(self.models / sha, sha, pointer["plan_hash"], pointer["source_sha256"])

    def history(self) -> list[str]:
        """Weights sha256 of the kept models, newest activation first."""
        pointer = self._pointer()
        return list(pointer["history"]) if pointer else []

    def verify_active(self) -> tuple[MultiTaskModel, dict]:
        """Load the active model from disk, checking the file sha256 and the arrays sha256 it is named by."""
        stored = self.active()
        if stored is None:
            raise ValidationError(f"model store {self.root}: no active model")
        try:
            model, card = load_model(stored.directory)
        except NotAModelDir as e:
            raise ValidationError(f"model store: active model is damaged ({e})") from None
        got = arrays_sha256(state_arrays(model))
        if got != stored.weights_sha256 or card.get("arrays_sha256") != got:
            raise ValidationError(f"model store: active model holds weights {got[:12]}..., "
                                  f"not {stored.weights_sha256[:12]}...")
        if PruningPlan.from_dict(card["plan"]).plan_hash != stored.plan_hash:
            raise ValidationError("model store: active model's plan differs from the pointer's")
        return model, card

    def note_scored(self, base_sha256: str, tasks: Collection[str], directory: str) -> None:
        """Remember which base model this device scored (and where it is), so that a delivery after a
        restart of the device or the server can still be checked against it."""
        record = {"base_sha256": base_sha256, "tasks": list(tasks), "directory": str(directory)}
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / self.SCORED, json.dumps(record).encode())

    def scored(self) -> dict | None:
        """{base_sha256, tasks, directory} of the base model this device last scored, or None."""
        path = self.root / self.SCORED
        try:
            record = json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            return None
        ok = isinstance(record, dict) and isinstance(record.get("base_sha256"), str) and isinstance(
            record.get("tasks"), list) and isinstance(record.get("directory"), str)
        return record if ok else None

    def _pointer(self) -> dict | None:
        path = self.root / self.ACTIVE
        if not path.is_file():
            return None
        try:
            pointer = json.loads(path.read_text())
            if not isinstance(pointer, dict) or not all(isinstance(pointer.get(k), str) for k in (
                    "weights_sha256", "plan_hash", "source_sha256")) or not isinstance(pointer.get("history"), list):
                raise ValueError("fields missing")
        except ValueError as e:
            raise ValidationError(f"model store: {path} is damaged ({e})") from None
        return pointer

    def _collect(self, kept: set[str]) -> None:
        for entry in self.models.iterdir():  # also half-written ".<sha>.*" directories left by a crash
            if entry.is_dir() and entry.name not in kept:
                shutil.rmtree(entry, ignore_errors=True)
                _LOADED.pop(entry.name, None)


def load(stored: StoredModel) -> MultiTaskModel:
    """The held model (cached per process; weights checked against the card when read from disk)."""
    if stored.weights_sha256 in _LOADED:
        _LOADED.move_to_end(stored.weights_sha256)
        return _LOADED[stored.weights_sha256]
    model, card = load_model(stored.directory)
    if card.get("arrays_sha256") != stored.weights_sha256:
        raise ValidationError(f"store: {stored.directory} does not hold weights {stored.weights_sha256[:12]}...")
    _remember(stored.weights_sha256, model)
    return model


def _remember(sha: str, model: MultiTaskModel) -> None:
    _LOADED[sha] = model
    _LOADED.move_to_end(sha)
    while len(_LOADED) > _MAX_LOADED:
        _LOADED.popitem(last=False)


__all__ = ["ModelStore", "StoredModel", "accept_spec", "load", "rebuild", "receive", "receive_weights"]
