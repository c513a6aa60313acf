"""Secure aggregation of importance scores (`[scoring] secure_aggregation = true`): Flower's SecAgg+.

The score phase runs `flwr.server.workflow.SecAggPlusWorkflow` (four `train` rounds: setup, share keys,
collect masked vectors, unmask) on exactly the ledger's active devices. Each device sends one flat vector
laid out over all tasks of the base model (protocol.layout.Layout: per-task weighted scores, then per-task
weights), masked by `secaggplus_mod`; the server unmasks only their sum. From the sum it takes, per task,
weighted score sum / total weight: the weighted mean of the plain path (`server.aggregate.aggregate(...,
"weighted-mean")` over per-task normalised reports), up to quantisation.

What the server therefore never holds: any device's scores, its sample count, or whether its vector was
valid. Consequences (docs/FEDERATION.md, "Secure aggregation"): only the weighted mean is possible (a
median, trimmed mean or server clipping needs individual reports; `Settings.validate` refuses them, and
personalisation, which needs the device's own scores); devices validate and cap their own vectors.

Quantisation: SecAgg+ maps each value in [-c, c] to an integer in [0, Q] (stochastic rounding) and sums
modulo M. c is the largest channel count of a task (a non-negative mean-1 vector cannot exceed it, so no
value is ever clipped); M = 2**32 (Flower's default); Q is the largest power of two with n * Q < M for n
devices (no overflow), at most 2**30. The error of a summed coordinate has std <= sqrt(n) * c / Q.

Distributed differential privacy (`[scoring] privacy = "distributed"`, server.privacy): the layout carries
the devices' noise recipe (protocol.layout.DistributedNoise: transform, clip, share std z C / sqrt(n_min)
with n_min = `dp_min_devices`, or every device asked when 0). If fewer than n_min devices sent masked
vectors, the unmask stage is never run: the release is aborted (every participant excluded with the
reason) and the sum, which would carry less noise than calibrated, is never reconstructed. Otherwise the
server divides the per-task sums by the total weights, shrinks each channel group towards its mean by the
noise variance it knows (n (z C)^2 / n_min / W^2; `dp_shrinkage`), clamps at 0 and inverts the transform.

Flower's workflow is driven directly, with a `LegacyContext` and a small legacy `Strategy` that selects
the ledger's active devices and receives the unmasked aggregate; the grid it talks through counts payload
bytes per device and records which device failed which stage, so the ledger gets reasons as in plain mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from cut.fusion import TaskScores
from protocol.layout import LAYOUT_FIELD, DistributedNoise, Layout
from protocol.records import REQUEST, content_nbytes
from server.ledger import FAILED, Ledger
from server.planning import BaseModel
from server.privacy import shrink
from server.settings import Settings

MODULUS_RANGE = 2**32  # Flower's default mask modulus
MAX_QUANTIZATION_RANGE = 2**30  # Flower's quantiser rounds into int32
STAGES = ("setup", "share keys", "masked vectors", "unmask")

def layout_of(base: BaseModel, settings: Settings, devices: int = 0) -> Layout:
    """The vector layout of this base model: its tasks in order, each task's groups and sizes, and under
    distributed DP the noise recipe for a release of at least min_devices(settings, devices) devices."""
    tasks = base.task_names
    s = settings.scoring
    scale = float(s.num_batches * s.batch_size)  # the most samples a device uses
    dp = None
    if s.privacy == "distributed":
        n_min = min_devices(settings, devices)
        dp = DistributedNoise(s.dp_transform, s.dp_clip, s.dp_noise_multiplier * s.dp_clip / math.sqrt(n_min), n_min)
    return Layout.of(base.task_groups(tasks), base.analysis(tasks).sizes, scale, dp)


def min_devices(settings: Settings, devices: int) -> int:
    """n_min of distributed DP: the setting, or (0) every one of the `devices` asked to score; at least 2."""
    return max(2, settings.scoring.dp_min_devices or devices)


def quantization_range(devices: int) -> int:
    """The largest power of two Q with devices * Q < MODULUS_RANGE (the sum never wraps), capped."""
    return min(MAX_QUANTIZATION_RANGE, 1 << int(math.floor(math.log2((MODULUS_RANGE - 1) / max(devices, 1)))))


def shares(devices: int) -> tuple[int | float, int]:
    """SecAgg+ (num_shares, reconstruction_threshold): every device shares with all others in a small
    fleet, with an odd ring of about 2 log2(n) + 1 neighbours in a large one; a majority of a device's
    shares rebuilds its masks (so the server cannot get both the secrets of one device)."""
    if devices <= 9:
        return 1.0, devices // 2 + 1  # 1.0: all devices (Flower's float form); the threshold is an int
    k = min(devices if devices % 2 else devices - 1, 2 * math.ceil(math.log2(devices)) + 1)
    return k, k // 2 + 1


def secure_aggregate(grid: Grid, ledger: Ledger, settings: Settings, base: BaseModel,
                     contents: Mapping[int, RecordDict]) -> TaskScores:
    """Per-task weighted-mean scores of the ledger's active devices, from their SecAgg+ sum only.

    `contents` are the devices' plain scoring messages (ScoringRequest and base model transport); the
    vector layout is added to each. Devices that fail a stage are excluded with the reason; if the
    protocol cannot complete, every participant is excluded and the result is empty.
    """
    active = [r.node_id for r in ledger.active()]
    layout = layout_of(base, settings, len(active))
    for node_id in active:
        contents[node_id][REQUEST][LAYOUT_FIELD] = layout.to_json()
    result: TaskScores = {}
    if len(active) < 2:
        for node_id in active:
            ledger.exclude(node_id, FAILED, "score", "secure aggregation needs at least 2 devices")
        return result
    if layout.dp is not None and len(active) < layout.dp.min_devices:
        for node_id in active:
            ledger.exclude(node_id, FAILED, "score", f"distributed DP release not started: {len(active)} device(s) "
                                                     f"can take part, dp_min_devices is {layout.dp.min_devices}")
        return result
    num_shares, threshold = shares(len(active))
    metered = MeteredGrid(grid, ledger)
    strategy = SumStrategy([GridClientProxy(nid, grid, 0) for nid in active])
    workflow = ScoresWorkflow(contents, num_shares, threshold, max_weight=1.0,
                              clipping_range=layout.clipping_range, quantization_range=quantization_range(len(active)),
                              modulus_range=MODULUS_RANGE, timeout=settings.timeouts.score,
                              min_devices=layout.dp.min_devices if layout.dp else 0)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1,
                                                                      WorkflowKey.START_TIME: time.time()})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    try:
        workflow(metered, context)
        failure = workflow.aborted or ("" if strategy.mean is not None else (
            f"{len(active) - len(metered.problems)} of {len(active)} devices answered every stage; SecAgg+ needs "
            f"{threshold} of each device's neighbours"))
        total = None if failure else strategy.mean * strategy.contributors
        mean = {} if failure else (weighted_mean(layout, total) if layout.dp is None else
                                   private_mean(layout, total, strategy.contributors, settings.scoring.dp_shrinkage))
    except Exception as e:  # noqa: BLE001 - a malformed reply can break the protocol; no device gets a plan
        failure = f"{type(e).__name__}: {str(e).strip()[:200]}"
    for node_id, reason in metered.problems.items():
        ledger.exclude(node_id, FAILED, "score", f"secure aggregation, {reason}")
    if failure:
        for record in ledger.active():
            if record.node_id in active:
                ledger.exclude(record.node_id, FAILED, "score", f"secure aggregation did not complete ({failure})")
        return result
    for node_id in active:
        ledger.records[node_id].bytes_up_scores = metered.uploads.get(node_id, 0)
    result.update(mean)
    return result


def weighted_mean(layout: Layout, total: np.ndarray) -> TaskScores:
    """Summed vectors -> per task: weighted score sums / total weight, scaled like server.aggregate's
    normalised reports (each device sent mean-1 scores; the plain path divides each report by its sum)."""
    sums, weights = layout.unflatten(total)
    out: TaskScores = {}
    for task, groups in sums.items():
        if weights[task] < 0.5 / layout.weight_scale:  # less than half a sample: no device holds the task
            continue
        n = layout.channels(task)
        out[task] = {g: np.maximum(v / (weights[task] * n), 0.0).astype(np.float32) for g, v in groups.items()}
    return out


def private_mean(layout: Layout, total: np.ndarray, contributors: int, shrinkage: bool = True) -> TaskScores:
    """Distributed DP: the unmasked sum -> per task the weighted mean of u_t (noise std per coordinate
    share_std sqrt(n) / W_t), shrunk per channel group by that variance, decoded back to scores that sum to 1
    over the task (layout.dp.decode). Everything here is post-processing of the release."""
    dp = layout.dp
    sums, weights = layout.unflatten(total)
    noise_var_sum = contributors * dp.share_std ** 2
    out: TaskScores = {}
    for task, groups in sums.items():
        w = weights[task]
        if w < 0.5 / layout.weight_scale:  # less than half a sample: no device holds the task
            continue
        names = list(groups)
        est = [groups[g] / w for g in names]
        if shrinkage:
            est = [shrink(v, noise_var_sum / w ** 2) for v in est]
        values = dp.decode(np.concatenate(est), layout.channels(task))
        out[task], start = {}, 0
        for g, v in zip(names, est, strict=True):
            out[task][g] = values[start:start + v.size].astype(np.float32)
            start += v.size
    return out


class ScoresWorkflow(SecAggPlusWorkflow):
    """SecAgg+ whose masked-vector round carries our scoring messages (ScoringRequest, base model) in
    place of legacy FitIns; the device's handler reads them as in plain mode. With `min_devices` (distributed
    DP) it stops before unmasking when fewer devices sent masked vectors, and says why in `aborted`."""

    def __init__(self, contents: Mapping[int, RecordDict], *args, min_devices: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.contents = contents
        self.min_devices = min_devices
        self.aborted = ""

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return super().collect_masked_vectors_stage(grid, context, state)

    def unmask_stage(self, grid, context, state) -> bool:
        if len(state.active_node_ids) < self.min_devices:
            self.aborted = (f"distributed DP release aborted before unmasking: {len(state.active_node_ids)} "
                            f"device(s) sent masked vectors, the noise is calibrated for at least "
                            f"{self.min_devices} (dp_min_devices); no sum was revealed")
            return False
        return super().unmask_stage(grid, context, state)


class SumStrategy(Strategy):
    """The legacy strategy SecAgg+ calls: selects the given devices and keeps the unmasked aggregate.

    SecAgg+ divides the sum by the devices' summed `num_examples`; every device reports 1, so the sum is
    mean x contributors (its weights travel inside the vector)."""

    def __init__(self, proxies: list[GridClientProxy]) -> None:
        self.proxies = proxies
        self.mean: np.ndarray | None = None
        self.contributors = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(Parameters([], ""), {})) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
            self.contributors = len(results)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class MeteredGrid:
    """The grid as the workflow sees it: payload bytes per device, and each device's first problem."""

    def __init__(self, grid: Grid, ledger: Ledger) -> None:
        self.grid, self.ledger = grid, ledger
        self.calls = 0
        self.problems: dict[int, str] = {}
        self.uploads: dict[int, int] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        stage = STAGES[min(self.calls, len(STAGES) - 1)]
        self.calls += 1
        messages = list(messages)
        for msg in messages:
            self.ledger.records[msg.metadata.dst_node_id].bytes_down += payload_bytes(msg.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            answered.add(node_id)
            if reply.has_error():
                lines = (reply.error.reason or f"error code {reply.error.code}").strip().splitlines()
                self.problems.setdefault(node_id, f"{stage}: device error: {lines[-1] if lines else ''}"[:500])
                continue
            n = payload_bytes(reply.content)
            self.ledger.records[node_id].bytes_up += n
            self.uploads[node_id] = self.uploads.get(node_id, 0) + n
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.problems.setdefault(msg.metadata.dst_node_id, f"{stage}: no reply within {timeout or 0:g} s")
        return replies


def payload_bytes(content: RecordDict) -> int:
    """protocol.records.content_nbytes, also for the protocol's config records (Flower's count_bytes fails
    on empty strings and empty lists, which SecAgg+ messages hold)."""
    total = 0
    for record in content.values():
        if not isinstance(record, ConfigRecord):
            total += content_nbytes(RecordDict({"r": record}))
            continue
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            total += len(key) + sum(len(v) if isinstance(v, (str, bytes)) else 1 if isinstance(v, bool) else 8
                                    for v in values)
    return total


__all__ = ["MeteredGrid", "ScoresWorkflow", "SumStrategy", "layout_of", "min_devices", "payload_bytes", "private_mean",
           "quantization_range", "secure_aggregate", "shares", "weighted_mean"]
