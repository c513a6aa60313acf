"""The federation's report: report.json (per device + summary), report.md, and two plots.

Per device: its tasks, budget, status (ok / rejected / failed) and reason, the size it reached (params
and MACs as measured on the device, as ratios to its dense decomposed model), the multi-task delta
(docs/EVALUATION.md) with the per-task metrics it came from, and the bytes it sent and received. Uplink bytes
are also given for the scores alone, as a fraction of the dense decomposed model's weight bytes: the
download the device would otherwise need, and the yardstick for "scores are cheap to send".
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from cut.latency import CHECK_TOLERANCE
from cut.train import multitask_delta
from server.ledger import OK, DeviceRecord, Ledger
from server.planning import UNDER_TOLERANCE, BaseModel, PlanBook, latency_error
from server.privacy import device_privacy, run_privacy
from server.settings import Settings


def device_delta(record: DeviceRecord, metrics: dict[str, dict[str, float]], base: BaseModel) -> float | None:
    """delta_m of `metrics` against the device's dense metrics (None when it cannot be computed)."""
    if not metrics or not record.metrics_dense:
        return None
    try:
        value = multitask_delta(base.model, metrics, {t: record.metrics_dense[t] for t in record.tasks})
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def measured_latency_error(record: DeviceRecord) -> float | None:
    """Measured on the device / asked - 1 for a latency budget (server.planning.latency_error); None without
    the device's measurement."""
    sizes, prof = record.sizes, record.profile
    if prof is None or not sizes.get("latency_dense_ms"):
        return None
    return latency_error(prof.budget, sizes["latency_ms"], sizes["latency_dense_ms"])


def device_entry(record: DeviceRecord, base: BaseModel) -> dict[str, Any]:
    prof = record.profile
    sizes = record.sizes
    params_ratio = (sizes["params_compact"] / sizes["params_dense"] if sizes.get("params_dense")
                    else record.achieved.get("params_ratio"))
    macs_ratio = (sizes["macs_compact"] / sizes["macs_dense"] if sizes.get("macs_dense")
                  else record.achieved.get("macs_ratio"))
    return {
        "device_id": record.device_id or f"node-{record.node_id}",
        "declared_id": record.declared_id or None,
        "node_id": record.node_id,
        "node_key": record.node_key or None,
        "device_class": prof.device_class if prof else "",
        "tasks": list(record.tasks or (prof.tasks if prof else ())),
        "budget": prof.budget.value if prof else None,
        "budget_kind": prof.budget.kind if prof else None,
        "status": record.status,
        "reason": record.reason,
        "plan_hash": record.plan_hash,
        "weights_sha256": record.held_sha256,
        "params_ratio": params_ratio,
        "macs_ratio": macs_ratio,
        # a latency budget: the plan's ratio predicted by the device's own table, and its budget in ms if given
        "latency_ratio_predicted": record.achieved.get("latency_ratio_predicted"),
        "latency_ms_predicted": record.achieved.get("latency_ms_predicted"),
        "budget_ms": (prof.budget.milliseconds or None) if prof else None,
        # ... and what the device measured when the model arrived (the compact and its dense model, interleaved)
        "latency_ms_measured": sizes.get("latency_ms"),
        "latency_ratio_measured": (sizes["latency_ms"] / sizes["latency_dense_ms"] if sizes.get("latency_dense_ms")
                                   else None),
        "latency_error_measured": measured_latency_error(record),
        # a memory budget (cut.memory: weight + peak activation bytes), and its budget in bytes if given
        "memory_ratio": record.achieved.get("memory_ratio"),
        "memory_bytes": record.achieved.get("memory_bytes"),
        "budget_bytes": (prof.budget.memory_bytes or None) if prof else None,
        "delta_m": device_delta(record, record.metrics_compact, base),
        "delta_m_oneshot": device_delta(record, record.metrics_oneshot, base),
        "delta_m_delivered": device_delta(record, record.metrics_delivered or record.metrics_compact, base),
        "adapted": record.adapted,
        "metrics_delivered": record.metrics_delivered,
        "metrics_dense": record.metrics_dense,
        "metrics_compact": record.metrics_compact,
        "metrics_oneshot": record.metrics_oneshot,
        "eval_samples": int(sizes.get("eval_samples", 0)),
        "bytes_up": record.bytes_up,
        "bytes_up_scores": record.bytes_up_scores,
        "report_source": record.report_source,
        "bytes_down": record.bytes_down,
        "bytes_dense_model": record.bytes_dense,
        "scores_to_dense_bytes": record.bytes_up_scores / record.bytes_dense if record.bytes_dense else None,
        "uplink_to_dense_bytes": record.bytes_up / record.bytes_dense if record.bytes_dense else None,
    }


# Two-sided 95% Student t quantiles by degrees of freedom (beyond the table: the normal 1.96).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (the nearest tabulated df below)."""
    below = [k for k in _T95 if k <= dof]
    return _T95[max(below)] if below else math.inf


def _stats(values: list[float]) -> dict[str, float] | None:
    """mean, min, max, median, n and the half-width of the mean's 95% t-interval (`ci95`)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    n = len(values)
    half = t95(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "median": statistics.median(values), "n": n, "ci95": half}


def grouped(entries: list[dict], key) -> dict[str, dict[str, float] | None]:
    """delta_m statistics per group of devices (by budget, by task subset)."""
    groups: dict[str, list[float]] = {}
    for e in entries:
        groups.setdefault(key(e), []).append(e["delta_m"])
    return {k: _stats(v) for k, v in sorted(groups.items())}


def within_budget(entry: dict[str, Any]) -> bool:
    if entry["budget_kind"] == "latency":  # against the device's table (ms budgets: plan value = ms / dense ms)
        ms, budget_ms = entry.get("latency_ms_predicted"), entry.get("budget_ms")
        if budget_ms:
            return ms is not None and ms <= budget_ms * (1 + 1e-9)
        ratio = entry.get("latency_ratio_predicted")
    elif entry["budget_kind"] == "memory":  # bytes budgets: plan value = min(1, bytes / dense bytes)
        nbytes, budget_bytes = entry.get("memory_bytes"), entry.get("budget_bytes")
        if budget_bytes:
            return nbytes is not None and nbytes <= budget_bytes * (1 + 1e-9)
        ratio = entry.get("memory_ratio")
    else:
        ratio = entry["params_ratio"] if entry["budget_kind"] == "params" else entry["macs_ratio"]
    return ratio is not None and ratio <= entry["budget"] + 1e-9


def summarise(entries: list[dict], settings: Settings, base: BaseModel, book: PlanBook,
              seconds: dict[str, float]) -> dict[str, Any]:
    ok = [e for e in entries if e["status"] == OK]
    status = Counter(e["status"] for e in entries)
    return {
        "scenario": settings.name,
        "status": "ok" if len(ok) >= settings.min_devices else "failed",
        "devices_expected": settings.devices,
        "devices_registered": len(entries),
        "devices_ok": status.get("ok", 0),
        "devices_rejected": status.get("rejected", 0),
        "devices_failed": status.get("failed", 0),
        "task_subsets": len({tuple(e["tasks"]) for e in ok}),
        "distinct_plans": len({e["plan_hash"] for e in ok}),
        "compact_models_built": len(book.builds),
        "all_within_budget": all(within_budget(e) for e in ok),
        # latency budgets: measured on each device when its model arrived / asked - 1 (None: no latency budget)
        "latency_error_measured": _stats([e.get("latency_error_measured") for e in ok]),
        "params_ratio": _stats([e["params_ratio"] for e in ok]),
        "delta_m": _stats([e["delta_m"] for e in ok]),
        "delta_m_oneshot": _stats([e["delta_m_oneshot"] for e in ok]),
        "delta_m_delivered": _stats([e.get("delta_m_delivered") for e in ok]),
        "devices_adapted": sum(e.get("adapted") is True for e in ok),
        "devices_at_or_above_dense": sum(e["delta_m"] is not None and e["delta_m"] >= 0 for e in ok),
        "delta_m_by_budget": grouped(ok, lambda e: f"{e['budget_kind']}={e['budget']:g}"),
        "delta_m_by_tasks": grouped(ok, lambda e: ",".join(e["tasks"])),
        "bytes_up_scores": _stats([float(e["bytes_up_scores"]) for e in ok]),
        "reports_resumed": sum(e["report_source"] == "resumed" for e in entries),
        "scores_to_dense_bytes": _stats([e["scores_to_dense_bytes"] for e in ok]),
        "uplink_to_dense_bytes": _stats([e.get("uplink_to_dense_bytes") for e in ok]),
        "bytes_up": _stats([float(e["bytes_up"]) for e in entries]),
        "bytes_down": _stats([float(e["bytes_down"]) for e in entries]),
        "full_model_bytes": int(base.card.get("weights_bytes", 0)),
        "base_model": {"dir": str(base.directory), "id": base.model_id, "sha256": base.sha256},
        "finetune_rounds": settings.finetune.rounds,
        "personalisation": settings.planning.personalisation,
        "aggregation": settings.scoring.aggregation,
        "trim_fraction": settings.scoring.trim_fraction if settings.scoring.aggregation == "trimmed-mean" else None,
        "server_clip": settings.scoring.server_clip,
        "privacy": privacy_block(entries, settings),
        "seconds": seconds,
        "seconds_total": round(sum(seconds.values()), 3),
    }


def device_epsilon(settings: Settings, num_tasks: int) -> float | None:
    """epsilon at scoring.dp_delta spent by a device reporting `num_tasks` task vectors (None: no noise)."""
    return device_privacy(settings.scoring, num_tasks)


def privacy_block(entries: list[dict], settings: Settings) -> dict[str, Any]:
    """The privacy spent by the devices' score reports (server.privacy): epsilon per device, max over the
    devices asked to score, at scoring.dp_delta; mode 'none' when devices add no noise."""
    return run_privacy(settings.scoring, entries)


def write_report(ledger: Ledger, settings: Settings, base: BaseModel, book: PlanBook,
                 seconds: dict[str, float], recovery: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.json, report.md and the plots into settings.out_dir; returns the summary."""
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted((device_entry(r, base) for r in ledger), key=lambda e: e["device_id"])
    for e in entries:
        e["dp_epsilon"] = device_epsilon(settings, len(e["tasks"]))
    summary = summarise(entries, settings, base, book, seconds)
    summary["recovery"] = recovery
    report = {"summary": summary, "devices": entries}
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2, allow_nan=False))
    (out / "report.md").write_text(markdown(report))
    plot(entries, out)
    print(f"{SUMMARY_PREFIX}{json.dumps(_finite(summary_line(summary, out)))}", file=sys.stderr, flush=True)
    return summary


SUMMARY_PREFIX = "cutfl report: "  # the ServerApp's last log line; `cutfl run` reads it from `flwr log`


def summary_line(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """The figures a person checks first: status, devices ok of expected, mean delta_m, where the report is."""
    delta = summary.get("delta_m") or {}
    return {"status": summary["status"], "devices_ok": summary["devices_ok"],
            "devices_expected": summary["devices_expected"], "devices_registered": summary["devices_registered"],
            "devices_rejected": summary["devices_rejected"], "devices_failed": summary["devices_failed"],
            "delta_m_mean": delta.get("mean"), "delta_m_ci95": delta.get("ci95"), "report": str(out.resolve())}


def _finite(value: Any) -> Any:
    """NaN / inf (a metric over no valid pixel) become null: report.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


TASK_COLUMNS = {"seg": "miou", "depth": "abs_err", "normals": "mean_angle"}  # the scenes tasks' primary metrics


def _task_cell(entry: dict[str, Any], task: str, metric: str) -> str:
    dense, compact = entry["metrics_dense"].get(task, {}), entry["metrics_compact"].get(task, {})
    if metric not in dense or metric not in compact:
        return "-"
    return f"{dense[metric]:.3g} -> {compact[metric]:.3g}"


def _missing(summary: dict[str, Any]) -> str:
    """', N of the M devices the scenario expects never registered' when some did not."""
    expected, registered = summary.get("devices_expected") or 0, summary["devices_registered"]
    if expected <= registered:
        return ""
    return f"; {expected - registered} of the {expected} devices the scenario expects never registered"


def _interval(stats: dict[str, Any]) -> str:
    half = stats.get("ci95")
    return "-" if half is None else f"[{stats['mean'] - half:.2f}, {stats['mean'] + half:.2f}]"


def _mean_ci(stats: dict[str, Any]) -> str:
    half = stats.get("ci95")
    return f"mean {stats['mean']:.2f}" + ("" if half is None else f" +- {half:.2f} (95% interval, n={stats['n']})")


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"# Federation report: {s['scenario']}",
        "",
        f"Status **{s['status']}**: {s['devices_ok']} of {s['devices_registered']} devices completed "
        f"({s['devices_rejected']} rejected, {s['devices_failed']} failed"
        f"{_missing(s)}); {s['task_subsets']} task subsets, "
        f"{s['distinct_plans']} distinct plans, {s['compact_models_built']} compact models built; "
        f"all within budget: {s['all_within_budget']}.",
        "",
    ]
    recovery = s.get("recovery") or {}
    if recovery.get("recovered") or recovery.get("resumed"):
        lines.append(f"Server-side recovery: {recovery['budget']} per plan on the server's data "
                     f"({recovery['data']}), {recovery['recovered']} plan(s) recovered in {recovery['seconds']:.0f} s"
                     f" ({recovery['resumed']} kept from an earlier run).")
    latency = s.get("latency_error_measured")
    if latency:
        checks = recovery.get("latency_checks") or {}
        lines.append(f"Latency budgets (timed on each device beside its dense model when its model arrived, against "
                     f"its budget): median error {latency['median']:+.1%} (min {latency['min']:+.1%}, max "
                     f"{latency['max']:+.1%}, n={latency['n']}); re-planned more than {CHECK_TOLERANCE:.0%} over or "
                     f"{UNDER_TOLERANCE:.0%} under: "
                     f"{checks.get('replanned', 0)} time(s) in {checks.get('rounds', 0)} round(s) "
                     f"({checks.get('recovered', 0)} new plan(s) recovered in {checks.get('seconds_recovery', 0.0):.0f} s"
                     f", {checks.get('reverted', 0)} device(s) back to an earlier plan that fitted or was less over), "
                     f"{checks.get('over_at_end', 0)} device(s) still more than {CHECK_TOLERANCE:.0%} over, "
                     f"{checks.get('under_at_end', 0)} more than {UNDER_TOLERANCE:.0%} under.")
    when = "as delivered" if not s["finetune_rounds"] else f"after {s['finetune_rounds']} fine-tune round(s)"
    if s["delta_m"]:
        lines.append(f"delta_m ({when}; per device, on its own held-out samples, against the dense model): "
                     f"{_mean_ci(s['delta_m'])}, min {s['delta_m']['min']:.2f}, max {s['delta_m']['max']:.2f}.")
    if s["delta_m_oneshot"]:
        lines.append(f"delta_m as delivered (before fine-tuning): {_mean_ci(s['delta_m_oneshot'])}.")
    if s.get("devices_adapted") or any(e.get("adapted") is not None for e in report["devices"]):
        lines.append(f"On-device adaptation kept by {s['devices_adapted']} of {s['devices_ok']} devices (the others' "
                     f"validation said no); as delivered: {_mean_ci(s['delta_m_delivered'])}; "
                     f"{s['devices_at_or_above_dense']} devices at or above the dense model.")
    if s.get("uplink_to_dense_bytes"):
        lines.append(f"Uplink per device (every byte it sent: scores, metrics, updates): mean "
                     f"{s['bytes_up']['mean']:.0f} bytes = {100 * s['uplink_to_dense_bytes']['mean']:.3f}% of its dense "
                     f"decomposed model (max {100 * s['uplink_to_dense_bytes']['max']:.3f}%); scores alone "
                     f"{100 * s['scores_to_dense_bytes']['mean']:.3f}%.")
    privacy = s.get("privacy") or {}
    if privacy.get("mode") == "local":
        lines.append(f"Privacy: {privacy['statement']}: epsilon {privacy['epsilon']:.3g} (RDP accountant; exact "
                     f"analytic Gaussian {privacy['epsilon_analytic']:.3g}) at delta {privacy['delta']:g}, clip norm "
                     f"{privacy['clip_norm']:g}, noise multiplier {privacy['noise_multiplier']:g}. Mechanism: "
                     f"{privacy['mechanism']}; sensitivity {privacy['sensitivity']}. Assumptions: "
                     f"{'; '.join(privacy['assumptions'])}.")
    elif privacy:
        lines.append(f"Privacy: {privacy['statement']}.")
    robust = s["aggregation"] + (f" (trim {s['trim_fraction']:g})" if s.get("trim_fraction") is not None else "")
    if s.get("server_clip"):
        robust += f", server clip {s['server_clip']:g} x the median norm"
    lines.append(f"Aggregation: {robust}.")
    for title, key in (("budget", "delta_m_by_budget"), ("task subset", "delta_m_by_tasks")):
        if s.get(key):
            lines += ["", f"| {title} | devices | mean delta_m | 95% interval | min | max |", "|---|---|---|---|---|---|"]
            lines += [f"| {k} | {v['n']} | {v['mean']:.2f} | {_interval(v)} | {v['min']:.2f} | {v['max']:.2f} |"
                      for k, v in s[key].items() if v]
    lines += ["", "Phase wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()), "",
              "Per device: params and MACs of the compact model as fractions of the device's dense decomposed "
              "model; delta_m on its own held-out samples (`as delivered`: before fine-tuning or adaptation); "
              "bytes up = everything it sent, bytes down = everything it received (the scoring request, the "
              "compact weights with their spec, phase configs: above the dense model's size only when the base "
              "weights travel with the arrays transport).", "",
              "| device | class | tasks | budget | status | params (x dense) | MACs (x dense) | delta_m | as delivered "
              "| eval samples | bytes up | bytes down | reason |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["devices"]:
        delivered = e["delta_m_oneshot"] if e["delta_m_oneshot"] is not None else e.get("delta_m_delivered")
        lines.append(
            f"| {e['device_id']} | {e['device_class']} | {','.join(e['tasks'])} | "
            f"{e['budget_kind'] or ''} {_fmt(e['budget'], '.2f')} | {e['status']} | {_fmt(e['params_ratio'])} | "
            f"{_fmt(e['macs_ratio'])} | {_fmt(e['delta_m'], '.2f')} | {_fmt(delivered, '.2f')} | "
            f"{e.get('eval_samples', '-')} | {e['bytes_up']} | {e['bytes_down']} | {e['reason'].replace('|', '/')} |")
    lines += ["", "## Per-task primary metrics (dense -> compact)", "",
              "| device | " + " | ".join(TASK_COLUMNS) + " |", "|---|" + "---|" * len(TASK_COLUMNS)]
    for e in report["devices"]:
        if e["metrics_compact"]:
            cells = [_task_cell(e, t, m) for t, m in TASK_COLUMNS.items()]
            lines.append(f"| {e['device_id']} | " + " | ".join(cells) + " |")
    lines += ["", "All metrics of every task are in report.json. Plots: size_vs_delta.png, fleet.png.", ""]
    return "\n".join(lines)


def plot(entries: list[dict[str, Any]], out: Path) -> None:
    """size_vs_delta.png (model size vs delta_m per device) and fleet.png (budgets and task subsets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in entries if e["status"] == OK and e["params_ratio"] is not None]
    subsets = sorted({",".join(e["tasks"]) for e in entries if e["tasks"]})
    colours = {s: plt.cm.tab10(i % 10) for i, s in enumerate(subsets)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for subset in subsets:
        pts = [e for e in ok if ",".join(e["tasks"]) == subset and e["delta_m"] is not None]
        if pts:
            ax.scatter([e["params_ratio"] for e in pts], [e["delta_m"] for e in pts], label=subset,
                       color=colours[subset], alpha=0.8, s=30)
    for budget in sorted({e["budget"] for e in ok if e["budget_kind"] == "params"}):
        ax.axvline(budget, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("compact params / dense decomposed params (dashed: budgets)")
    ax.set_ylabel("delta_m (%)")
    ax.set_title("Model size vs multi-task delta, per device")
    if ok:
        ax.legend(fontsize=7, title="tasks", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "size_vs_delta.png", dpi=120)
    plt.close(fig)

    fig = fleet_figure(entries)
    fig.savefig(out / "fleet.png", dpi=120)
    plt.close(fig)


def fleet_figure(entries: list[dict[str, Any]]):
    """fleet.png's figure: devices per task subset stacked by budget (left), devices per final status (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    subsets = sorted({",".join(e["tasks"]) for e in entries if e["tasks"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = sorted({e["budget"] for e in entries if e["budget"] is not None})
    bottom = [0] * len(subsets)
    for i, budget in enumerate(budgets):
        counts = [sum(1 for e in entries if ",".join(e["tasks"]) == s and e["budget"] == budget) for s in subsets]
        left.bar(subsets, counts, bottom=bottom, label=f"{budget:g}", color=plt.cm.viridis(i / max(1, len(budgets))))
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    left.set_title("Devices per task subset and budget")
    left.set_xlabel("task subset")
    left.set_ylabel("devices")
    left.tick_params(axis="x", rotation=45, labelsize=7)
    if budgets:
        left.legend(fontsize=7, title="budget", title_fontsize=8)
    statuses = Counter(e["status"] for e in entries)
    right.bar(list(statuses), list(statuses.values()), color=["tab:green" if s == OK else "tab:red" for s in statuses])
    right.set_title("Device status at the end of the run")
    right.set_xlabel("status")
    right.set_ylabel("devices")
    for axis in (left, right):  # device counts are whole numbers: no 0.5 ticks
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


__all__ = ["SUMMARY_PREFIX", "device_delta", "device_entry", "fleet_figure", "markdown", "plot", "summarise", "summary_line",
           "within_budget", "write_report"]
