"""The device side of the federation (Flower ClientApp, Message API).

| message         | the device                                                                 |
|-----------------|----------------------------------------------------------------------------|
| query.profile   | works out who it is (its node config; in simulation, simulations.fleet) and replies with its TaskProfile |
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

`app` is the production ClientApp (`flower-supernode` runs it): a device is who its node config says.
`make_client_app(identify, hooks)` builds the same handlers with another way to know who the device is and
with hooks (client.hooks); the simulation runner uses it, mirroring `server.app.make_server_app`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client import base, secure, store
from client.adapt import adapt
from client.data import LocalData, local_data
from client.device import Device, device_from_node_config
from client.hooks import NO_HOOKS, DeviceHooks
from client.latency import delivered_latency, measured_budget
from client.scoring import score_and_encode
from cut.compact import recalibrate_batchnorm
from cut.importance import take_batches
from cut.messages import ValidationError
from cut.models import MultiTaskModel, count_macs, count_params
from cut.plan import PruningPlan
from cut.train import evaluate, finetune, make_loader
from cut.wire import decode_request, encode_profile
from protocol.layout import LAYOUT_FIELD, Layout
from protocol.phases import (
    Adoption,
    DataSpec,
    DeliverConfig,
    EvaluateConfig,
    FinetuneConfig,
    ProfileConfig,
    ScoreConfig,
)
from protocol.records import (
    BASE,
    CONFIG,
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
    record_arrays,
    state_arrays,
)

ERROR_REFUSED = 1001  # the device refused the request (validation)
ERROR_FAILED = 1002  # the device failed while handling it

STATE = "cutfl"  # this device's small persistent record in context.state

Identify = Callable[[Context, DataSpec | None], Device]  # who am I, given what data the base model expects


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


def node_config_device(context: Context, data: DataSpec | None) -> Device:
    """A real device: who its node config says it is."""
    return device_from_node_config(context.node_config, data)


def _data_defaults(context: Context) -> DataSpec | None:
    """What the server said the base model expects (kept from the profile query)."""
    text = _state(context).get("data_spec")
    return DataSpec.from_json(text) if isinstance(text, str) and text else None


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


def _seed(seed: int, device: Device) -> int:
    return seed * 100_003 + device.partition_id


# ------------------------------------------------------------------------------------------ handlers


def make_client_app(identify: Identify = node_config_device, hooks: DeviceHooks = NO_HOOKS) -> ClientApp:
    """The device's ClientApp: `identify` says who the device is, `hooks` may change what it does."""
    client = ClientApp()
    handlers = Handlers(identify, hooks)
    client.query("profile")(guarded(handlers.profile))
    client.query("score")(guarded(handlers.score))
    client.train(mods=[_refusals, secaggplus_mod])(handlers.secure_score)
    client.train("deliver")(guarded(handlers.deliver))
    client.train("finetune")(guarded(handlers.finetune_round))
    client.evaluate()(guarded(handlers.evaluate_models))
    return client


def _refusals(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Outermost mod of the secure handler: its failures become error replies like every other handler's."""
    return guarded(call_next)(msg, context)


class Handlers:
    """One handler per message type (module docstring), for a device known by `identify`."""

    def __init__(self, identify: Identify, hooks: DeviceHooks) -> None:
        self.identify = identify
        self.hooks = hooks

    def device(self, context: Context) -> Device:
        return self.identify(context, _data_defaults(context))

    def profile(self, msg: Message, context: Context) -> Message:
        """Who am I: tasks, budget, class and how many samples I hold."""
        config = ProfileConfig.from_record(msg.content.config_records.get(CONFIG))
        if config.data_spec:
            config.data()  # refuse a malformed spec now, not in a later phase
            _state(context)["data_spec"] = config.data_spec
        device = self.device(context)
        self.hooks.before("profile", device)
        data = local_data(device)
        mine = device.profile(data.num_train)
        if device.budget.kind == "latency":  # time the base model's shapes here (cached): client.latency
            budget = measured_budget(device.budget, device.tasks, config, device.latency_threads, device.store_root)
            mine = dataclasses.replace(mine, budget=budget)
        profile = self.hooks.outgoing("profile", device, mine)
        content = RecordDict({PROFILE_REC: ConfigRecord({"data": encode_profile(profile)})})
        return Message(content, reply_to=msg)

    def score(self, msg: Message, context: Context) -> Message:
        """Per-task channel scores of my decomposed base model on my own data; only scores leave."""
        device, cfg, request, model, data = self._scoring_inputs(msg, context)
        self.hooks.before("score", device)
        header, arrays = score_and_encode(device, model, data, request, cfg.dtype, _seed(cfg.seed, device),
                                          self.hooks)
        self.hooks.after("score", device)
        content = RecordDict({REPORT: ConfigRecord({"header": header}), SCORES: arrays_record(arrays)})
        return Message(content, reply_to=msg)

    def secure_score(self, msg: Message, context: Context) -> Message:
        """query.score under SecAgg+ (`[scoring] secure_aggregation`): the same request and scoring, sent as one
        vector (client.secure) that secaggplus_mod masks; the server learns only the sum over devices."""
        device, cfg, request, model, data = self._scoring_inputs(msg, context)
        layout = Layout.from_json(field(config_of(msg.content, REQUEST), LAYOUT_FIELD, str, REQUEST))
        self.hooks.before("secure-score", device)
        vector = secure.secure_vector(device, model, data, request, layout, _seed(cfg.seed, device), self.hooks)
        return Message(secure.legacy_reply(vector), reply_to=msg)

    def _scoring_inputs(self, msg: Message, context: Context):
        """A scoring request checked against who I am, my decomposed base model (refused if the base model or
        tasks do not match) and my data: (device, config, request, model, data)."""
        device = self.device(context)
        cfg = ScoreConfig.from_record(config_of(msg.content, REQUEST))
        request = decode_request(cfg.data, known_tasks=device.tasks)
        if set(request.tasks) != set(device.tasks):
            raise ValidationError(f"ScoringRequest: tasks {list(request.tasks)} are not this device's "
                                  f"{list(device.tasks)}")
        model = _receive_base(msg, device, cfg, request.base_model_sha256, tuple(request.tasks))
        return device, cfg, request, model, local_data(device)

    def deliver(self, msg: Message, context: Context) -> Message:
        """Verify, adapt and keep my compact model; report what I received and hold (+ one-shot metrics)."""
        device = self.device(context)
        self.hooks.before("deliver", device)
        scored = _scored_base(device)
        record = msg.content.config_records.get(CONFIG)
        cfg, adoption = DeliverConfig.from_record(record), Adoption.from_record(record)
        spec_bytes = field(config_of(msg.content, SPEC), "data", bytes, SPEC)
        arrays = record_arrays(msg.content.array_records.get(WEIGHTS), WEIGHTS)
        model, spec = store.receive(spec_bytes, arrays, device.tasks, scored["base_sha256"])
        model, stored = _adopt(device, adoption, model, spec.plan, spec.weights_sha256)
        _state(context)["delivered_sha256"] = stored.weights_sha256
        metrics: dict[str, float] = {"params": float(count_params(model))}
        if adoption.adapt_steps > 0:  # on-device adaptation, kept only if it helps on my validation half
            adapted, outcome = adapt(model, _dense(device), local_data(device), adoption,
                                     _seed(adoption.adapt_steps, device))
            metrics["adapt_accepted"] = float(outcome["accepted"])
            if outcome["accepted"]:
                stored = _models(device).put_active(adapted, spec.plan, spec.weights_sha256)
                model = adapted
        if device.budget.kind == "latency":  # what the budget bought here: timed beside the dense model
            metrics.update(delivered_latency(model, _dense(device), device.latency_threads))
        if cfg.evaluate:
            metrics.update(metrics_record("compact", _evaluate(model, local_data(device), cfg.batch_size)))
        return Message(RecordDict({CONFIG: _holding(stored), METRICS: MetricRecord(metrics)}), reply_to=msg)

    def finetune_round(self, msg: Message, context: Context) -> Message:
        """K steps of task loss + distillation from my dense base, on my data; reply with the weights."""
        device, cfg, stored = self._holding_phase(msg, context, "finetune", FinetuneConfig)
        data = local_data(device)
        student = copy.deepcopy(store.load(stored))
        teacher = _dense(device)
        seed = _seed(cfg.seed, device) + 7 * cfg.round
        torch.manual_seed(seed)
        loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=seed)
        finetune(student, teacher, loader, steps=cfg.steps, lr=cfg.lr, distill_weight=cfg.distill_weight,
                 progress=False)
        student.eval()
        content = RecordDict({WEIGHTS: arrays_record(state_arrays(student)),
                              METRICS: MetricRecord({"num_examples": int(data.num_train)})})
        return Message(content, reply_to=msg)

    def _holding_phase(self, msg: Message, context: Context, phase: str, config_class):
        """A phase on the model I hold: who I am, the phase's config, and my model after adopting any
        weights the server sent with it (a FedAvg result)."""
        device = self.device(context)
        self.hooks.before(phase, device)
        record = config_of(msg.content, CONFIG)
        cfg, adoption = config_class.from_record(record), Adoption.from_record(record)
        return device, cfg, _adopt_sent_weights(msg, device, adoption, cfg.weights_sha256)

    def evaluate_models(self, msg: Message, context: Context) -> Message:
        """Dense vs compact on my held-out samples, per task, plus both models' parameters and MACs."""
        device, cfg, stored = self._holding_phase(msg, context, "evaluate", EvaluateConfig)
        compact = store.load(stored)
        dense = _dense(device)
        data = local_data(device)
        delivered = _state(context).get("delivered_sha256")
        if isinstance(delivered, str) and delivered != stored.weights_sha256 and stored.source_sha256 == cfg.weights_sha256:
            # I hold my adaptation of the delivered model: report the model as delivered too
            kept = store.StoredModel(_models(device).models / delivered, delivered, stored.plan_hash,
                                     stored.source_sha256)
            extra = metrics_record("delivered", _evaluate(store.load(kept), data, cfg.batch_size))
        else:
            extra = {}
        metrics = {
            **metrics_record("dense", _evaluate(dense, data, cfg.batch_size)),
            **metrics_record("compact", _evaluate(compact, data, cfg.batch_size)),
            **extra,
            "params_dense": float(count_params(dense)),
            "params_compact": float(count_params(compact)),
            "macs_dense": float(count_macs(dense)),
            "macs_compact": float(count_macs(compact)),
            "eval_samples": float(len(data.eval)),
        }
        return Message(RecordDict({METRICS: MetricRecord(metrics), CONFIG: _holding(stored)}), reply_to=msg)


def _receive_base(msg: Message, device: Device, cfg: ScoreConfig, sha: str, tasks: tuple[str, ...]) -> MultiTaskModel:
    """My decomposed base model, by the transport the server chose (shared path or arrays)."""
    if cfg.transport == "path":
        directory = cfg.base_model_dir
        model = base.decomposed(sha, tasks, directory)
    else:
        arrays = record_arrays(msg.content.array_records.get(BASE), BASE)
        directory = str(_store_root(device) / "base" / f"{sha[:16]}-{'-'.join(tasks)}")
        model = base.from_arrays(sha, tasks, cfg.architecture, arrays, cfg.base_arrays_sha256, Path(directory))
    _models(device).note_scored(sha, tasks, directory)
    return model


def _adopt(device: Device, adoption: Adoption, model: MultiTaskModel, plan: PruningPlan,
           source_sha: str) -> tuple[MultiTaskModel, store.StoredModel]:
    """Make server weights mine: optionally re-estimate BatchNorm statistics on my own samples (pruning
    and averaging shift them; my data is what the model will see), then keep them as my active model."""
    if adoption.recalibrate_bn:
        batches = take_batches(make_loader(local_data(device).train, adoption.bn_batch_size, shuffle=False),
                               adoption.bn_batches)
        model = recalibrate_batchnorm(copy.deepcopy(model), batches)
    return model, _models(device).put_active(model, plan, source_sha)


def _adopt_sent_weights(msg: Message, device: Device, adoption: Adoption, expected: str) -> store.StoredModel:
    """If the server sent new weights for my plan (a FedAvg result), verify and adopt them first."""
    stored = _stored(device)
    record: ArrayRecord | None = msg.content.array_records.get(WEIGHTS)
    if record is None or expected == stored.source_sha256:
        return stored
    model, plan = store.receive_weights(stored, record_arrays(record, WEIGHTS), expected)
    return _adopt(device, adoption, model, plan, expected)[1]


def _holding(stored: store.StoredModel) -> ConfigRecord:
    return ConfigRecord({"received_sha256": stored.source_sha256, "weights_sha256": stored.weights_sha256,
                         "plan_hash": stored.plan_hash})


def _evaluate(model: MultiTaskModel, data: LocalData, batch_size: int) -> dict[str, dict[str, float]]:
    return evaluate(model, make_loader(data.eval, batch_size), list(model.task_names))


app = make_client_app()

__all__ = ["ERROR_FAILED", "ERROR_REFUSED", "Identify", "app", "make_client_app", "node_config_device"]
