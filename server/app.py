"""The federation, as the server runs it (Flower ServerApp, Message API with a Grid).

One file on purpose (about 480 lines): the federation reads top to bottom as one script, and each phase's
messages are built and read next to each other.

    profile   query.profile  -> each device's TaskProfile (tasks, budget, samples)
    score     query.score    -> each device's ImportanceReport for its tasks, on its private data
    aggregate                   per task, across the devices that hold it (weighted by samples used;
                                under SecAgg+ the unmasked sum is all the server has)
    plan                        per device: personalise, fuse for its task subset, cut to its budget;
                                one compact model per distinct plan
    recover                     each distinct plan distilled from the dense model on the server's own data
    deliver   train.deliver  -> plan + weights; the device verifies, stores and reports what it holds
    finetune  train.finetune -> opt-in rounds of distillation, FedAvg among devices sharing a plan
    evaluate  evaluate       -> per-task metrics of dense vs compact on each device's held-out data
    report                      report.json, report.md, plots

A device whose reply is missing, late, an error or invalid is excluded with its reason (see
server.ledger); the others complete. `app` reads its settings from the run config (`flwr run`);
`make_server_app(settings)` binds them directly (the in-process simulation runner).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from cut.budget import BUDGET_KINDS, BudgetOptions
from cut.fusion import TaskScores
from cut.latency import CHECK_TOLERANCE
from cut.messages import DEFAULT_LIMITS, Limits, PrivacySettings, ScoringRequest, ValidationError
from cut.progress import progress_enabled
from cut.wire import arrays_limits, declared_device_id, decode_profile, decode_report, encode_request, report_limits
from protocol.phases import DeliverConfig, EvaluateConfig, FinetuneConfig, ProfileConfig, ScoreConfig, merged
from protocol.records import (
    BASE,
    CONFIG,
    DELIVER,
    EVALUATE,
    FINETUNE,
    METRICS,
    PROFILE,
    PROFILE_REC,
    REPORT,
    REQUEST,
    SCORE,
    SCORES,
    SPEC,
    WEIGHTS,
    arrays_record,
    config_of,
    content_nbytes,
    field,
    metric_value,
    read_metrics,
    record_arrays,
    sha256_field,
)
from server.aggregate import aggregate, bound_updates, check_update, fedavg, median_capped, personalise
from server.exchange import exchange, wait_for_nodes
from server.identity import Identities, node_keys
from server.ledger import REJECTED, DeviceRecord, Ledger
from server.planning import BaseModel, Build, PlanBook, latency_error, measured_budget, off_latency, over_latency
from server.recovery import UpdateGate, recover_plans
from server.report import measured_latency_error, write_report
from server.rundir import RunState
from server.secagg import secure_aggregate
from server.settings import Settings, from_run_config, resolve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = from_run_config(context.run_config)
    summary = run_federation(grid, settings)
    if summary["status"] != "ok":  # so that `flwr ls` says finished:failed, not finished:completed
        raise RuntimeError(f"the federation failed: {summary['devices_ok']} of {summary['devices_expected']} devices "
                           f"completed (min_devices {settings.min_devices}); report in {settings.out_dir}")


def make_server_app(settings: Settings) -> ServerApp:
    """A ServerApp bound to `settings` (run_simulation leaves the run config empty)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, settings)

    return server


def run_federation(grid: Grid, settings: Settings) -> dict:
    """The whole federation; returns the report's summary."""
    seconds: dict[str, float] = {}
    clock = functools.partial(timed, seconds)
    base = BaseModel.load(settings.base_model_dir)
    settings = resolve(settings, base.card)
    with clock("wait"):
        ledger = Ledger(wait_for_nodes(grid, settings.devices, settings.timeouts.nodes))
    state = RunState(settings.out_dir, base.sha256, settings.name, settings.resume)
    with clock("profile"):
        collect_profiles(grid, ledger, settings, base, state)
    with clock("score"):
        restore_reports(ledger, state, base)
        secure_mean = collect_scores(grid, ledger, settings, base, state)
    with clock("plan"):
        aggregated = aggregate_scores(ledger, settings, state, secure_mean)
        restore_latency_timings(ledger, state, base)
        book = plan_devices(ledger, settings, base, aggregated)
    with clock("recover"):
        recovery = recover_plans(book, base, settings.recovery, state, progress=progress_enabled())
    with clock("deliver"):
        deliver_models(grid, ledger, settings, book)  # as recovered (cached by plan hash): what one-shot measures
    with clock("latency-checks"):  # devices whose model measured over their latency budget: planned again
        recovery["latency_checks"] = recheck_latency(grid, ledger, settings, base, book, aggregated, state)
    restore_weights(book, state)  # then a resumed run goes on from each plan's fine-tuned weights
    gate = (UpdateGate(base, settings.recovery)
            if settings.finetune.gate and settings.finetune.rounds > state.finetune_round else None)
    for round_ in range(state.finetune_round + 1, settings.finetune.rounds + 1):
        with clock(f"finetune-{round_}"):
            finetune_round(grid, ledger, settings, book, round_, gate)
            keep_weights(book, state, round_)
    if gate is not None:
        recovery["finetune_updates_refused"] = sum(gate.refused.values())
    with clock("evaluate"):
        evaluate_devices(grid, ledger, settings, book)
    return write_report(ledger, settings, base, book, seconds, recovery)


def restore_weights(book: PlanBook, state: RunState) -> None:
    """Keep every plan in the run directory; a resumed run continues from each plan's last averaged weights.

    Called after delivery: the delivered weights are the plan's recovered ones, so the one-shot metrics a
    resumed run reports are those of the model before fine-tuning, as in a run that was never interrupted;
    the next finetune round or the evaluation then sends each device its plan's fine-tuned weights."""
    for plan_hash, build in list(book.builds.items()):
        state.keep_plan(build.plan)
        kept = state.kept_weights(plan_hash) if state.finetune_round > 0 else None
        if kept is not None and check_update(kept, build.arrays) == "":
            book.with_weights(plan_hash, kept)


def keep_weights(book: PlanBook, state: RunState, round_: int) -> None:
    """After a finetune round: every plan's averaged weights, then the round number (in that order)."""
    for plan_hash, build in book.builds.items():
        state.keep_weights(plan_hash, build.arrays)
    state.finished_round(round_)


@contextlib.contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Wall time of one phase, for the report."""
    start = time.perf_counter()
    yield
    seconds[phase] = round(time.perf_counter() - start, 3)


# ------------------------------------------------------------------------------------------ profile


def collect_profiles(grid: Grid, ledger: Ledger, settings: Settings, base: BaseModel,
                     state: RunState | None = None) -> None:
    """query.profile: who each device is; the query says what data the base model expects (DataSpec).

    A device is the node that answered; the device id it declares is checked (server.identity) against the
    pins of [identity], the nodes that held restored ids before a restart, and the ids taken earlier in
    this phase: a clash refuses the newcomer, never the device that holds the id."""
    query = ProfileConfig(data_spec=settings.data.to_json(), architecture=base.model.config.to_json(),
                          base_model_sha256=base.sha256).to_record()
    contents = {r.node_id: RecordDict({CONFIG: ConfigRecord(dict(query))}) for r in ledger.active()}
    replies = exchange(grid, ledger, "profile", PROFILE, contents, settings.timeouts.profile, settings.max_in_flight)
    identities = Identities(settings.identity.pinned_ids, state.kept_identities() if state is not None else {},
                            node_keys(grid))
    for node_id, reply in replies.items():
        record = ledger.records[node_id]
        record.node_key = identities.keys.get(node_id, "")
        data = None
        try:
            data = field(config_of(reply.content, PROFILE_REC), "data", bytes, "TaskProfile")
            profile = decode_profile(data, known_tasks=base.task_names)
            if profile.budget.kind not in BUDGET_KINDS:
                raise ValidationError(f"TaskProfile: budget kind {profile.budget.kind!r} is not supported "
                                      f"(use {' or '.join(BUDGET_KINDS)})")
            problem = identities.problem(profile.device_id, node_id)
            if problem:
                raise ValidationError(f"TaskProfile: {problem}")
        except ValidationError as e:
            if isinstance(data, bytes):  # keep what it claimed to be, labelled as unverified, for the operator
                record.declared_id = declared_device_id(data)
            ledger.exclude(node_id, REJECTED, "profile", str(e))
            continue
        identities.accept(profile.device_id, node_id)
        record.profile, record.device_id, record.tasks = profile, profile.device_id, base.canonical(profile.tasks)
    if state is not None:
        state.keep_identities(identities.bindings(identities.taken.items()))


# -------------------------------------------------------------------------------------------- score


def collect_scores(grid: Grid, ledger: Ledger, settings: Settings, base: BaseModel, state: RunState | None = None
                   ) -> TaskScores | None:
    """query.score: each device scores its own tasks; invalid reports are rejected with the reason.

    Devices whose report was restored from the run directory (a resumed run) are not asked again; new
    valid reports are kept there. Under SecAgg+ the server holds no report: it returns the per-task mean
    it unmasked instead (None in plain mode, and for a resumed secure run that keeps its aggregate)."""
    make = score_content_factory(settings, base)
    if settings.scoring.secure_aggregation:  # SecAgg+: the server learns per-task sums only (server.secagg)
        if state is not None and state.resumed and state.has_aggregated([r.device_id for r in ledger.active()]):
            for record in ledger.active():  # the same devices' secure sum is kept: nobody scores again
                record.report_source = "resumed"
            return None
        mean = secure_aggregate(grid, ledger, settings, base, {r.node_id: make(r) for r in ledger.active()})
        for record in ledger.active():
            record.report_source = "secure-sum"  # in the sum; the server never held this device's report
        return mean
    contents = {r.node_id: make(r) for r in ledger.active() if r.report is None}
    replies = exchange(grid, ledger, "score", SCORE, contents, settings.timeouts.score, settings.max_in_flight)
    # No report can be larger than one for every task of the base model: anything beyond is refused before
    # it is parsed, anything within is decoded and then checked against the device's own tasks.
    every = base.task_names
    upload_limits = report_limits(every, base.analysis(every).sizes, base.task_groups(every))
    for node_id, reply in replies.items():
        record = ledger.records[node_id]
        try:
            header, arrays = report_parts(reply.content, upload_limits)
            record.report = decode_device_report(header, arrays, record, base)
        except ValidationError as e:
            ledger.exclude(node_id, REJECTED, "score", str(e))
            continue
        record.bytes_up_scores = content_nbytes(reply.content)
        record.report_source = "scored"
        if state is not None:
            state.keep_report(record.device_id, header, arrays)
    return None


def restore_reports(ledger: Ledger, state: RunState, base: BaseModel) -> None:
    """A resumed run: devices that reported before the restart get their kept report back (validated like a
    fresh one); a kept report that no longer fits the device (other tasks, damaged) is dropped."""
    if not state.resumed:
        return
    for record in ledger.active():
        kept = state.kept_report(record.device_id)
        if kept is None:
            continue
        try:
            record.report = decode_device_report(*kept, record, base)
        except ValidationError:
            continue  # the device scores again
        record.report_source = "resumed"


def score_content_factory(settings: Settings, base: BaseModel) -> Callable[[DeviceRecord], RecordDict]:
    """Builds each device's ScoringRequest message; base weights travel only with the arrays transport."""
    s = settings.scoring
    privacy = PrivacySettings(clip_norm=s.clip_norm, noise_multiplier=s.noise_multiplier)
    base_records: dict[tuple[str, ...], ArrayRecord] = {}

    def make(record: DeviceRecord) -> RecordDict:
        request = ScoringRequest(base.model_id, base.sha256, record.tasks, s.criterion, s.num_batches, s.batch_size,
                                 privacy)
        config = ScoreConfig(data=encode_request(request), transport=settings.transport, dtype=s.dtype,
                             seed=settings.seed)
        content = RecordDict()
        if settings.transport == "path":
            config = dataclasses.replace(config, base_model_dir=str(base.directory.resolve()))
        else:
            arrays, sha = base.decomposed_arrays(record.tasks)
            if record.tasks not in base_records:
                base_records[record.tasks] = arrays_record(arrays)
            content[BASE] = ArrayRecord(dict(base_records[record.tasks]))
            config = dataclasses.replace(config, architecture=base.decomposed(record.tasks).config.to_json(),
                                         base_arrays_sha256=sha)
        content[REQUEST] = config.to_record()
        return content

    return make


def report_parts(content: RecordDict, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, dict]:
    """The wire parts of an ImportanceReport reply: protobuf header and score arrays (`limits`: what a valid
    report for the device's tasks can hold, so an oversized upload is refused before it is parsed)."""
    header = field(config_of(content, REPORT), "header", bytes, "ImportanceReport")
    return header, record_arrays(content.array_records.get(SCORES), "ImportanceReport", limits)


def decode_device_report(header: bytes, arrays: dict, record: DeviceRecord, base: BaseModel):
    """Decode and validate a device's ImportanceReport against what it was asked to score."""
    report = decode_report(header, arrays, known_tasks=record.tasks, group_sizes=base.analysis(record.tasks).sizes,
                           task_groups=base.task_groups(record.tasks), base_model_sha256=base.sha256)
    if set(report.tasks) != set(record.tasks):
        raise ValidationError(f"ImportanceReport: scores tasks {list(report.tasks)}, asked for {list(record.tasks)}")
    if report.device_id != record.device_id:
        raise ValidationError(f"ImportanceReport: device id {report.device_id!r} is not {record.device_id!r}")
    return report


# --------------------------------------------------------------------------------------------- plan


def sample_weights(record: DeviceRecord, most: int) -> dict[str, float]:
    """A device's weight per task: samples used, capped at the samples its profile declared and at `most`,
    the samples the scoring request let any device use (num_batches x batch_size): a device cannot buy
    influence by claiming more data than it was asked to score on."""
    declared = record.profile.samples_per_task
    return {t: float(max(0, min(n, declared.get(t, n), most))) for t, n in record.report.samples_used.items()}


def aggregate_scores(ledger: Ledger, settings: Settings, state: RunState | None = None,
                     secure_mean: TaskScores | None = None) -> TaskScores:
    """Per task, across the active devices: the secure sum's mean, or the configured (robust) rule over the
    individual reports. Kept in the run directory; a resumed run with the same devices reuses it."""
    active = ledger.active()
    if not active:
        return {}
    contributors = [r.device_id for r in active]
    kept = state.kept_aggregated(contributors) if state is not None and state.resumed else None
    if kept is not None:
        return kept
    aggregated = (secure_mean or {}) if settings.scoring.secure_aggregation else aggregate(
        [(r.report.scores, sample_weights(r, settings.scoring.num_batches * settings.scoring.batch_size))
         for r in active], settings.scoring.aggregation,
        trim_fraction=settings.scoring.trim_fraction, server_clip=settings.scoring.server_clip)
    if state is not None:
        state.keep_aggregated(aggregated, contributors)
    return aggregated


def plan_devices(ledger: Ledger, settings: Settings, base: BaseModel, aggregated: TaskScores) -> PlanBook:
    """Per device: personalise, fuse, cut to budget, build (once per plan)."""
    p = settings.planning
    book = PlanBook(base, BudgetOptions(p.min_channels, p.min_fraction, p.round_to), p.normalise)
    for record in ledger.active():
        plan_device(record, ledger, settings, base, book, aggregated)
    return book


def plan_device(record: DeviceRecord, ledger: Ledger, settings: Settings, base: BaseModel, book: PlanBook,
                aggregated: TaskScores) -> bool:
    """Plan and build one device's model from its profile (excluded, with the reason, if it cannot be planned)."""
    try:
        plan = device_plan(record.profile, record, settings, book, aggregated)
    except ValueError as e:
        ledger.exclude(record.node_id, REJECTED, "plan", str(e).splitlines()[0])
        return False
    record.plan_hash, record.achieved = plan.plan_hash, dict(plan.achieved)
    record.bytes_dense = base.dense_bytes(record.tasks)
    return True


def device_plan(prof, record: DeviceRecord, settings: Settings, book: PlanBook, aggregated: TaskScores):
    """The built plan of a device with profile `prof` (ValueError naming the problem if there is none)."""
    p = settings.planning
    key = None if p.personalisation > 0 else (
        record.tasks, prof.budget.kind, prof.budget.value, tuple(sorted(prof.task_priority.items())))
    own = record.report.scores if record.report is not None else None  # None in secure mode
    per_task = personalise(aggregated, own, record.tasks, p.personalisation)
    plan = book.plan(record.tasks, prof.budget, per_task, prof.task_priority, key)
    book.build(plan)
    return plan


def recheck_latency(grid: Grid, ledger: Ledger, settings: Settings, base: BaseModel, book: PlanBook,
                    aggregated: TaskScores, state: RunState | None) -> dict:
    """Devices whose delivered model measured more than 3% over their latency budget or more than 6% under it
    (server.planning.off_latency; their deliver reply's timing): the measurement joins their table's calibration
    (server.planning.measured_budget), they are planned again, the new plans recovered and delivered, at most
    `planning.latency_checks` times. Over budget breaks the budget; under it gives away accuracy the budget
    allows. A device whose last plan measured over ends with the earlier plan measured closest to the budget
    within it, or if none was within, the one measured least over, delivered again: as
    `cut.latency.check_plan` chooses."""
    out = {"rounds": 0, "replanned": 0, "over_at_end": 0}
    tried: dict[int, dict[str, float]] = {  # node -> plan hash -> its measured error (measured / asked - 1)
        r.node_id: {h: latency_error(r.profile.budget, ms, dense) for h, ms, dense in r.latency_timings}
        for r in ledger.active() if r.latency_timings}  # a resumed run: the plans timed before the restart
    for _ in range(settings.planning.latency_checks):
        replanned = []
        for record in filter(measured_off_latency, ledger.active()):
            sizes, plan = record.sizes, book.builds[record.plan_hash].plan
            tried.setdefault(record.node_id, {})[plan.plan_hash] = measured_latency_error(record)
            profile = dataclasses.replace(record.profile, budget=measured_budget(
                record.profile.budget, base.analysis(record.tasks), plan,
                sizes["latency_ms"] / sizes["latency_dense_ms"]))
            record.latency_timings.append((plan.plan_hash, sizes["latency_ms"], sizes["latency_dense_ms"]))
            if state is not None:  # a restarted server plans the device with this timing (restore_latency_timings)
                state.keep_plan(plan)
                state.keep_latency_timings(record.device_id, record.latency_timings)
            try:
                again = device_plan(profile, record, settings, book, aggregated)
            except ValueError as e:  # e.g. the corrected budget is below the smallest plan: keep the delivered one
                out.setdefault("kept", []).append({"device_id": record.device_id, "reason": str(e).splitlines()[0]})
                continue
            record.profile = profile
            if again.plan_hash != plan.plan_hash and again.plan_hash not in tried[record.node_id]:
                record.plan_hash, record.achieved = again.plan_hash, dict(again.achieved)
                replanned.append(record.node_id)
        if not replanned:
            break
        out["rounds"] += 1
        out["replanned"] += len(replanned)
        recovered = recover_plans(book, base, settings.recovery, state)  # the new plans (others: from the run dir)
        out["recovered"] = out.get("recovered", 0) + recovered.get("recovered", 0)
        out["seconds_recovery"] = out.get("seconds_recovery", 0.0) + recovered.get("seconds", 0.0)
        deliver_models(grid, ledger, settings, book, only=set(replanned))
    reverted = revert_over_latency(ledger, book, tried)
    if reverted:
        out["reverted"] = len(reverted)
        deliver_models(grid, ledger, settings, book, only=reverted)
    out["over_at_end"] = sum(map(measured_over_latency, ledger.active()))
    out["under_at_end"] = sum(measured_off_latency(r) and not measured_over_latency(r) for r in ledger.active())
    return out


def restore_latency_timings(ledger: Ledger, state: RunState, base: BaseModel) -> None:
    """A resumed run: the timings the latency checks had folded into each device's table (kept in the run
    directory) go into the table it sent again, before it is planned, so it starts where the checks had
    brought it instead of timing its way there again. A timing whose plan is not kept, or not of the device's
    tasks, is left out."""
    if not state.resumed:
        return
    for record in ledger.active():
        budget = record.profile.budget if record.profile is not None else None
        if budget is None or budget.kind != "latency" or budget.latency_table is None:
            continue
        timings = []
        for plan_hash, ms, dense_ms in state.kept_latency_timings(record.device_id):
            plan = state.kept_plan(plan_hash)
            if plan is None or tuple(plan.tasks) != tuple(record.tasks):
                continue
            try:
                budget = measured_budget(budget, base.analysis(record.tasks), plan, ms / dense_ms)
            except (KeyError, ValueError):  # a plan of other groups than this model's: not this device's
                continue
            timings.append((plan_hash, ms, dense_ms))
        record.profile = dataclasses.replace(record.profile, budget=budget)
        record.latency_timings = timings


def revert_over_latency(ledger: Ledger, book: PlanBook, tried: Mapping[int, Mapping[str, float]]) -> set[int]:
    """Devices that measured their last plan over budget: back to the earlier plan measured closest to the
    budget within it or, if every plan they were given measured over, to the one measured least over (as
    `cut.latency.check_plan` chooses; its build is in the book, recovered). Returns their node ids."""
    reverted = set()
    for node_id, errors in tried.items():
        record = ledger.records[node_id]
        if not record.ok or not measured_over_latency(record):
            continue
        earlier = {h: e for h, e in errors.items() if h in book.builds and h != record.plan_hash}
        within = {h: e for h, e in earlier.items() if e <= CHECK_TOLERANCE}
        if within:
            best = max(within, key=within.get)
        elif earlier and min(earlier.values()) < measured_latency_error(record):
            best = min(earlier, key=earlier.get)
        else:
            continue
        record.plan_hash, record.achieved = best, dict(book.builds[best].plan.achieved)
        reverted.add(node_id)
    return reverted


def measured_against(test: Callable[..., bool], record: DeviceRecord) -> bool:
    """`test` (server.planning.over_latency or off_latency) of the device's delivered model, by the timing in its
    deliver reply (False if it sent none)."""
    sizes = record.sizes
    return "latency_ms" in sizes and test(record.profile.budget, sizes["latency_ms"], sizes["latency_dense_ms"])


measured_over_latency = functools.partial(measured_against, over_latency)
measured_off_latency = functools.partial(measured_against, off_latency)


# ------------------------------------------------------------------------------------------ deliver


class WeightRecords:
    """One ArrayRecord per build version, shared by the messages of every device of that plan."""

    def __init__(self) -> None:
        self._cache: dict[str, ArrayRecord] = {}

    def __call__(self, build: Build) -> ArrayRecord:
        if build.weights_sha256 not in self._cache:
            self._cache[build.weights_sha256] = arrays_record(build.arrays)
        return ArrayRecord(dict(self._cache[build.weights_sha256]))


def deliver_models(grid: Grid, ledger: Ledger, settings: Settings, book: PlanBook, only: set[int] | None = None
                   ) -> None:
    """train.deliver: spec + weights (to the devices in `only`, default all); the device's reply must name the
    weights it was sent."""
    weights = WeightRecords()
    oneshot = settings.evaluation.oneshot and settings.finetune.rounds > 0
    config = DeliverConfig(evaluate=oneshot, batch_size=settings.evaluation.batch_size)
    contents = {}
    for r in ledger.active():
        if only is not None and r.node_id not in only:
            continue
        build = book.builds[r.plan_hash]
        contents[r.node_id] = RecordDict({
            SPEC: ConfigRecord({"data": build.spec_bytes}),
            WEIGHTS: weights(build),
            CONFIG: merged(config, settings.device.adoption()),
        })
    replies = exchange(grid, ledger, "deliver", DELIVER, contents, settings.timeouts.deliver, settings.max_in_flight)
    for node_id, reply in replies.items():
        record = ledger.records[node_id]
        build = book.builds[record.plan_hash]
        try:
            record.held_sha256 = check_holding(reply, build, "deliver reply")
            metrics = reply.content.metric_records.get(METRICS)
            record.sizes["params_compact"] = metric_value(metrics, "params", "deliver reply")
            if metrics is not None and "adapt_accepted" in metrics:
                record.adapted = metric_value(metrics, "adapt_accepted", "deliver reply") > 0
            if metrics is not None and "latency_ms" in metrics:  # a latency budget: timed on the device
                for key in ("latency_ms", "latency_dense_ms"):
                    record.sizes[key] = metric_value(metrics, key, "deliver reply", minimum=1e-6)
            if oneshot:
                record.metrics_oneshot = _task_metrics(metrics, "compact", record)
        except ValidationError as e:
            ledger.exclude(node_id, REJECTED, "deliver", str(e))
            continue
        record.weights_sha256 = build.weights_sha256


def check_holding(reply: Message, build: Build, where: str) -> str:
    """The device must say it adopted exactly the weights of `build`; returns the sha256 it holds."""
    cfg = config_of(reply.content, CONFIG)
    received = sha256_field(cfg, "received_sha256", where)
    if received != build.weights_sha256:
        raise ValidationError(f"{where}: device adopted weights {received[:12]}..., not {build.weights_sha256[:12]}...")
    return sha256_field(cfg, "weights_sha256", where)


def _task_metrics(metrics, prefix: str, record: DeviceRecord) -> dict[str, dict[str, float]]:
    values = read_metrics(metrics, prefix, f"{prefix} metrics")
    if set(values) != set(record.tasks):
        raise ValidationError(f"{prefix} metrics are for tasks {sorted(values)}, expected {list(record.tasks)}")
    return values


# ----------------------------------------------------------------------------------------- finetune


def finetune_round(grid: Grid, ledger: Ledger, settings: Settings, book: PlanBook, round_: int,
                   gate: UpdateGate | None = None) -> None:
    """train.finetune: local distillation on each device, then FedAvg among devices of one plan of the
    updates bounded against the weights the round started from (an outlier of a group of 3+ excluded,
    server.aggregate.bound_updates); a result that moves the plan away from the dense teacher on the
    server's validation data is not adopted."""
    f = settings.finetune
    weights = WeightRecords()
    contents = {}
    for r in ledger.active():
        build = book.builds[r.plan_hash]
        config = FinetuneConfig(round=round_, steps=f.steps, lr=float(f.lr), batch_size=f.batch_size,
                                distill_weight=float(f.distill_weight), seed=settings.seed,
                                weights_sha256=build.weights_sha256)
        content = RecordDict({CONFIG: merged(config, settings.device.adoption())})
        if r.weights_sha256 != build.weights_sha256:
            content[WEIGHTS] = weights(build)  # the plan's averaged weights from the previous round
        contents[r.node_id] = content
    replies = exchange(grid, ledger, f"finetune-{round_}", FINETUNE, contents, settings.timeouts.finetune,
                       settings.max_in_flight)
    updates: dict[str, list[tuple[int, dict, float]]] = defaultdict(list)  # plan -> (node, arrays, weight)
    for node_id, reply in replies.items():
        record = ledger.records[node_id]
        build = book.builds[record.plan_hash]
        try:
            arrays = record_arrays(reply.content.array_records.get(WEIGHTS), "finetune update",
                                   arrays_limits(build.arrays))
            problem = check_update(arrays, build.arrays)
            if problem:
                raise ValidationError(f"finetune update: {problem}")
            n = metric_value(reply.content.metric_records.get(METRICS), "num_examples", "finetune update")
        except ValidationError as e:
            ledger.exclude(node_id, REJECTED, f"finetune-{round_}", str(e))
            continue
        record.weights_sha256 = build.weights_sha256
        record.num_examples = int(n)
        declared = max(record.profile.samples_per_task.values(), default=n)
        most = f.steps * f.batch_size  # the samples a round can use: no device buys a larger share by claiming
        updates[record.plan_hash].append((node_id, arrays, min(max(n, 0.0), float(declared), float(most))))
    for plan_hash, group in updates.items():
        bounded, refused = bound_updates([arrays for _, arrays, _ in group], book.builds[plan_hash].arrays,
                                         f.clip_multiple)
        for i, why in refused.items():
            ledger.exclude(group[i][0], REJECTED, f"finetune-{round_}", f"finetune update: {why}")
        kept = sorted(bounded)
        averaged = fedavg(list(zip([bounded[i] for i in kept], median_capped([group[i][2] for i in kept]),
                                   strict=True)))
        if gate is None or gate.admit(book, plan_hash, averaged):
            book.with_weights(plan_hash, averaged)


# ----------------------------------------------------------------------------------------- evaluate


def evaluate_devices(grid: Grid, ledger: Ledger, settings: Settings, book: PlanBook) -> None:
    """evaluate: the final weights (if fine-tuning changed them) and per-task metrics dense vs compact."""
    weights = WeightRecords()
    contents = {}
    for r in ledger.active():
        build = book.builds[r.plan_hash]
        config = EvaluateConfig(weights_sha256=build.weights_sha256, batch_size=settings.evaluation.batch_size)
        content = RecordDict({CONFIG: merged(config, settings.device.adoption())})
        if r.weights_sha256 != build.weights_sha256:
            content[WEIGHTS] = weights(build)
        contents[r.node_id] = content
    replies = exchange(grid, ledger, "evaluate", EVALUATE, contents, settings.timeouts.evaluate, settings.max_in_flight)
    for node_id, reply in replies.items():
        record = ledger.records[node_id]
        try:
            metrics = reply.content.metric_records.get(METRICS)
            dense, compact = _task_metrics(metrics, "dense", record), _task_metrics(metrics, "compact", record)
            delivered = read_metrics(metrics, "delivered", "delivered metrics")
            if delivered:
                delivered = _task_metrics(metrics, "delivered", record)
            sizes = {key: metric_value(metrics, key, "evaluate reply")
                     for key in ("params_dense", "params_compact", "macs_dense", "macs_compact", "eval_samples")}
            held = check_holding(reply, book.builds[record.plan_hash], "evaluate reply")
        except ValidationError as e:
            ledger.exclude(node_id, REJECTED, "evaluate", str(e))
            continue
        record.metrics_dense, record.metrics_compact, record.held_sha256 = dense, compact, held
        record.metrics_delivered = delivered
        record.sizes.update(sizes)
        record.weights_sha256 = book.builds[record.plan_hash].weights_sha256


__all__ = ["app", "make_server_app", "run_federation"]
