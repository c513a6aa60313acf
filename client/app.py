"""The device side of the federation (Flower ClientApp, Message API).

| message         | the device                                                                 |
|-----------------|----------------------------------------------------------------------------|
| query.profile   | works out who it is (node config, or the fleet description in simulation) and replies with its TaskProfile |
| query.score     | scores its tasks' channels on its private data; replies with an ImportanceReport (scores only) |
| train (SecAgg+) | secure mode: the same scoring, sent as one masked vector whose sum the server learns (client.secure) |
| train.deliver   | verifies, rebuilds, adapts and stores its compact model; replies with what it holds (+ one-shot metrics) |
| train.finetune  | distils its compact model from its dense base on local data; replies with the weights (FedAvg) |
| evaluate        | per-task metrics of dense vs compact on its held-out data, and both models' sizes |

Adopting server weights (a delivered model or a FedAvg result), a device first re-estimates the
BatchNorm statistics on its own samples when asked to (`[device] recalibrate_bn`): pruning and averaging
shift those statistics, and the device's data is what the model will see. No weight changes, no gradients,
nothing leaves the device; it holds (and evaluates) the adapted model and tells the server both hashes.

A request the device refuses (bad spec, wrong base model, tampered weights) gets an error reply whose
reason names the problem; the server records it and the rest of the federation goes on.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client import base, secure, store
from client.data import LocalData, local_data
from client.device import Device, FleetSpec, device_from_node_config
from client.records import (
    BASE,
    CONFIG,
    FLEET,
    METRICS,
    PROFILE_REC,
    REPORT,
    REQUEST,
    SCORES,
    SPEC,
    WEIGHTS,
    arrays_record,
    config_of,
    field,
    metrics_record,
    optional_field,
    record_arrays,
    state_arrays,
)
from client.scoring import score_and_encode
from cut.compact import recalibrate_batchnorm
from cut.importance import take_batches
from cut.messages import ValidationError
from cut.models import MultiTaskModel, count_macs, count_params
from cut.plan import PruningPlan
from cut.train import evaluate, finetune, make_loader
from cut.wire import decode_request, encode_profile

ERROR_REFUSED = 1001  # the device refused the request (validation)
ERROR_FAILED = 1002  # the device failed while handling it

STATE = "cutfl"  # this device's small persistent record in context.state

app = ClientApp()


def guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn an exception into an error reply with a one-line reason (refused vs failed)."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ValidationError as e:
            return Message(Error(ERROR_REFUSED, f"refused: {e}"), reply_to=msg)
        except Exception as e:  # noqa: BLE001 - any failure is reported, the server decides
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return Message(Error(ERROR_FAILED, f"{type(e).__name__}: {first}"[:500]), reply_to=msg)

    return wrapper


# ------------------------------------------------------------------------------------- device state


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state.config_records:
        context.state[STATE] = ConfigRecord()
    return context.state.config_records[STATE]


def _device(context: Context) -> Device:
    fleet_json = _state(context).get("fleet")
    fleet = FleetSpec.from_json(fleet_json) if isinstance(fleet_json, str) and fleet_json else None
    return device_from_node_config(context.node_config, fleet)


def _store_root(device: Device) -> Path:
    """Where the device keeps what it downloads (the base model with the arrays transport)."""
    if device.store_root:
        return Path(device.store_root)
    return Path(tempfile.gettempdir()) / "cutfl-store" / device.device_id


def _models(device: Device) -> store.ModelStore:
    """The device's model store: its store dir, or its own subdirectory of the fleet's shared one."""
    root = _store_root(device)
    if device.store_shared:
        root = root / "devices" / device.device_id
    return store.ModelStore(root, device.store_keep)


def _stored(device: Device) -> store.StoredModel:
    stored = _models(device).active()
    if stored is None:
        raise ValidationError("device: no compact model has been delivered yet")
    return stored


def _scored_base(device: Device) -> dict:
    """The base model I scored: {base_sha256, tasks, directory} (kept on disk: it survives restarts)."""
    scored = _models(device).scored()
    if scored is None:
        raise ValidationError("device: a model was delivered before any scoring request")
    return scored


def _dense(device: Device) -> MultiTaskModel:
    scored = _scored_base(device)
    return base.decomposed(scored["base_sha256"], tuple(scored["tasks"]), scored["directory"])


def _maybe_drop_out(device: Device, phase: str) -> None:
    """A test device told to drop out at `phase` goes away: like a SuperNode that lost its connection, whose
    pending message Flower answers with an error (NODE_UNAVAILABLE)."""
    if device.misbehave == f"drop-{phase}":
        raise ConnectionError(f"device dropped out during {phase} (misbehave=drop-{phase})")


def _seed(cfg: ConfigRecord, device: Device) -> int:
    return int(optional_field(cfg, "seed", int, 0)) * 100_003 + device.partition_id


# ------------------------------------------------------------------------------------------ handlers


@app.query("profile")
@guarded
def profile(msg: Message, context: Context) -> Message:
    """Who am I: tasks, budget, class and how many samples I hold."""
    fleet = msg.content.config_records.get(FLEET)
    if fleet is not None:
        _state(context)["fleet"] = field(fleet, "spec", str, "fleet")
    device = _device(context)
    data = local_data(device)
    content = RecordDict({PROFILE_REC: ConfigRecord({"data": encode_profile(device.profile(data.num_train))})})
    return Message(content, reply_to=msg)


@app.query("score")
@guarded
def score(msg: Message, context: Context) -> Message:
    """Per-task channel scores of my decomposed base model on my own data; only scores leave."""
    device, cfg, request, model, data = _scoring_inputs(msg, context)
    dtype = optional_field(cfg, "dtype", str, "float16")
    header, arrays = score_and_encode(device, model, data, request, dtype, _seed(cfg, device))
    if device.misbehave == "slow":
        time.sleep(device.slow_seconds)
    content = RecordDict({REPORT: ConfigRecord({"header": header}), SCORES: arrays_record(arrays)})
    return Message(content, reply_to=msg)


def _refusals(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Outermost mod of the secure handler: its failures become error replies like every other handler's."""
    return guarded(call_next)(msg, context)


@app.train(mods=[_refusals, secaggplus_mod])
def secure_score(msg: Message, context: Context) -> Message:
    """query.score under SecAgg+ (`[scoring] secure_aggregation`): the same request and scoring, sent as one
    vector (client.secure) that secaggplus_mod masks; the server learns only the sum over devices."""
    device, cfg, request, model, data = _scoring_inputs(msg, context)
    layout = secure.Layout.from_json(field(cfg, secure.LAYOUT_FIELD, str, REQUEST))
    vector = secure.secure_vector(device, model, data, request, layout, _seed(cfg, device))
    return Message(secure.legacy_reply(vector), reply_to=msg)


def _scoring_inputs(msg: Message, context: Context):
    """A scoring request checked against who I am, my decomposed base model (refused if the base model or
    tasks do not match) and my data: (device, config, request, model, data)."""
    device = _device(context)
    cfg = config_of(msg.content, REQUEST)
    request = decode_request(field(cfg, "data", bytes, REQUEST), known_tasks=device.tasks)
    if set(request.tasks) != set(device.tasks):
        raise ValidationError(f"ScoringRequest: tasks {list(request.tasks)} are not this device's {list(device.tasks)}")
    model = _receive_base(msg, device, cfg, request.base_model_sha256, tuple(request.tasks))
    return device, cfg, request, model, local_data(device)


def _receive_base(msg: Message, device: Device, cfg: ConfigRecord, sha: str,
                  tasks: tuple[str, ...]) -> MultiTaskModel:
    """My decomposed base model, by the transport the server chose (shared path or arrays)."""
    transport = optional_field(cfg, "transport", str, "path")
    if transport == "path":
        directory = field(cfg, "base_model_dir", str, REQUEST)
        model = base.decomposed(sha, tasks, directory)
    elif transport == "arrays":
        arrays = record_arrays(msg.content.array_records.get(BASE), BASE)
        directory = str(_store_root(device) / "base" / f"{sha[:16]}-{'-'.join(tasks)}")
        model = base.from_arrays(sha, tasks, field(cfg, "architecture", str, REQUEST), arrays,
                                 field(cfg, "base_arrays_sha256", str, REQUEST), Path(directory))
    else:
        raise ValidationError(f"ScoringRequest: unknown model transport {transport!r}")
    _models(device).note_scored(sha, tasks, directory)
    return model


@app.train("deliver")
@guarded
def deliver(msg: Message, context: Context) -> Message:
    """Verify, adapt and keep my compact model; report what I received and hold (+ one-shot metrics)."""
    device = _device(context)
    _maybe_drop_out(device, "deliver")
    scored = _scored_base(device)
    cfg = msg.content.config_records.get(CONFIG) or ConfigRecord()
    spec_bytes = field(config_of(msg.content, SPEC), "data", bytes, SPEC)
    arrays = record_arrays(msg.content.array_records.get(WEIGHTS), WEIGHTS)
    model, spec = store.receive(spec_bytes, arrays, device.tasks, scored["base_sha256"])
    model, stored = _adopt(device, cfg, model, spec.plan, spec.weights_sha256)
    metrics: dict[str, float] = {"params": float(count_params(model))}
    if optional_field(cfg, "evaluate", bool, False):
        batch = int(optional_field(cfg, "batch_size", int, 32))
        metrics.update(metrics_record("compact", _evaluate(model, local_data(device), batch)))
    return Message(RecordDict({CONFIG: _holding(stored), METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.train("finetune")
@guarded
def finetune_round(msg: Message, context: Context) -> Message:
    """K steps of task loss + distillation from my dense base, on my data; reply with the weights."""
    device = _device(context)
    _maybe_drop_out(device, "finetune")
    cfg = config_of(msg.content, CONFIG)
    stored = _adopt_sent_weights(msg, device, cfg)
    data = local_data(device)
    student = copy.deepcopy(store.load(stored))
    teacher = _dense(device)
    seed = _seed(cfg, device) + 7 * int(optional_field(cfg, "round", int, 0))
    torch.manual_seed(seed)
    loader = make_loader(data.train, int(field(cfg, "batch_size", int, CONFIG)), shuffle=True, seed=seed)
    finetune(student, teacher, loader, steps=int(field(cfg, "steps", int, CONFIG)), lr=float(field(cfg, "lr", float)),
             distill_weight=float(optional_field(cfg, "distill_weight", float, 0.5)), progress=False)
    student.eval()
    content = RecordDict({WEIGHTS: arrays_record(state_arrays(student)),
                          METRICS: MetricRecord({"num_examples": int(data.num_train)})})
    return Message(content, reply_to=msg)


@app.evaluate()
@guarded
def evaluate_models(msg: Message, context: Context) -> Message:
    """Dense vs compact on my held-out samples, per task, plus both models' parameters and MACs."""
    device = _device(context)
    _maybe_drop_out(device, "evaluate")
    cfg = config_of(msg.content, CONFIG)
    stored = _adopt_sent_weights(msg, device, cfg)
    compact = store.load(stored)
    dense = _dense(device)
    data = local_data(device)
    batch = int(optional_field(cfg, "batch_size", int, 32))
    metrics = {
        **metrics_record("dense", _evaluate(dense, data, batch)),
        **metrics_record("compact", _evaluate(compact, data, batch)),
        "params_dense": float(count_params(dense)),
        "params_compact": float(count_params(compact)),
        "macs_dense": float(count_macs(dense)),
        "macs_compact": float(count_macs(compact)),
        "eval_samples": float(len(data.eval)),
    }
    return Message(RecordDict({METRICS: MetricRecord(metrics), CONFIG: _holding(stored)}), reply_to=msg)


def _adopt(device: Device, cfg: ConfigRecord, model: MultiTaskModel, plan: PruningPlan,
           source_sha: str) -> tuple[MultiTaskModel, store.StoredModel]:
    """Make server weights mine: optionally re-estimate BatchNorm statistics on my own samples (pruning
    and averaging shift them; my data is what the model will see), then keep them as my active model."""
    if optional_field(cfg, "recalibrate_bn", bool, False):
        batches = take_batches(make_loader(local_data(device).train, int(optional_field(cfg, "bn_batch_size", int,
                                                                                          16)), shuffle=False),
                               int(optional_field(cfg, "bn_batches", int, 4)))
        model = recalibrate_batchnorm(copy.deepcopy(model), batches)
    return model, _models(device).put_active(model, plan, source_sha)


def _adopt_sent_weights(msg: Message, device: Device, cfg: ConfigRecord) -> store.StoredModel:
    """If the server sent new weights for my plan (a FedAvg result), verify and adopt them first."""
    stored = _stored(device)
    record: ArrayRecord | None = msg.content.array_records.get(WEIGHTS)
    if record is None:
        return stored
    expected = field(cfg, "weights_sha256", str, CONFIG)
    if expected == stored.source_sha256:
        return stored
    model, plan = store.receive_weights(stored, record_arrays(record, WEIGHTS), expected)
    return _adopt(device, cfg, model, plan, expected)[1]


def _holding(stored: store.StoredModel) -> ConfigRecord:
    return ConfigRecord({"received_sha256": stored.source_sha256, "weights_sha256": stored.weights_sha256,
                         "plan_hash": stored.plan_hash})


def _evaluate(model: MultiTaskModel, data: LocalData, batch_size: int) -> dict[str, dict[str, float]]:
    return evaluate(model, make_loader(data.eval, batch_size), list(model.task_names))


__all__ = ["ERROR_FAILED", "ERROR_REFUSED", "app"]
