"""The federation report (server.report) from hand-built device records: per-device entries, the summary,
report.json / report.md and the plots. No Flower, no model weights (only the task config delta_m needs)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cut.data.scenes import scene_tasks
from cut.messages import Budget, TaskProfile
from cut.models import ModelConfig
from server import report
from server.ledger import FAILED, OK, REJECTED, Ledger
from server.settings import load_settings

BASE = SimpleNamespace(model=SimpleNamespace(config=ModelConfig(tasks=scene_tasks())), card={"weights_bytes": 4000},
                       directory=Path("base"), model_id="mtl", sha256="ab" * 32)
DENSE = {"seg": {"miou": 50.0, "pixel_acc": 80.0}, "depth": {"abs_err": 0.2}, "normals": {"mean_angle": 30.0}}


def profile(device_id: str, tasks: tuple[str, ...], kind: str = "params", value: float = 0.5, cls: str = "phone"):
    return TaskProfile(device_id, tasks, Budget(kind, value), cls, samples_per_task={t: 10 for t in tasks})


def ledger() -> Ledger:
    """Five devices: three ok (one on a MACs budget), one rejected at scoring, one failed at delivery."""
    book = Ledger([1, 2, 3, 4, 5])
    r = book.records
    # 1: seg + depth, params 0.5. delta_m = mean(-10 % miou, -10 % abs_err) = -10; one-shot mean(-20, -25) = -22.5
    r[1].device_id, r[1].profile, r[1].tasks = "device-0001", profile("device-0001", ("seg", "depth")), ("seg", "depth")
    r[1].metrics_dense = {t: DENSE[t] for t in ("seg", "depth")}
    r[1].metrics_compact = {"seg": {"miou": 45.0, "pixel_acc": 70.0}, "depth": {"abs_err": 0.22}}
    r[1].metrics_oneshot = {"seg": {"miou": 40.0, "pixel_acc": 60.0}, "depth": {"abs_err": 0.25}}
    r[1].sizes = {"params_dense": 1000, "params_compact": 400, "macs_dense": 2000, "macs_compact": 600,
                  "eval_samples": 12}
    r[1].plan_hash, r[1].held_sha256 = "p1", "1" * 64
    r[1].bytes_up, r[1].bytes_up_scores, r[1].bytes_down, r[1].bytes_dense = 300, 100, 2000, 1000
    # 2: normals, params 0.7. delta_m +10 (a lower angle is better), one-shot -10
    r[2].device_id, r[2].profile, r[2].tasks = "device-0002", profile("device-0002", ("normals",), value=0.7,
                                                                      cls="board"), ("normals",)
    r[2].metrics_dense = {"normals": DENSE["normals"]}
    r[2].metrics_compact = {"normals": {"mean_angle": 27.0}}
    r[2].metrics_oneshot = {"normals": {"mean_angle": 33.0}}
    r[2].sizes = {"params_dense": 500, "params_compact": 350, "macs_dense": 900, "macs_compact": 500}
    r[2].plan_hash, r[2].held_sha256 = "p2", "2" * 64
    r[2].bytes_up, r[2].bytes_up_scores, r[2].bytes_down, r[2].bytes_dense = 150, 50, 900, 500
    # 3: seg on a MACs budget of 0.4, sizes not measured: the plan's achieved ratios stand in. delta_m -5
    r[3].device_id, r[3].profile, r[3].tasks = "device-0003", profile("device-0003", ("seg",), "macs", 0.4), ("seg",)
    r[3].metrics_dense = {"seg": DENSE["seg"]}
    r[3].metrics_compact = {"seg": {"miou": 47.5}}
    r[3].metrics_oneshot = {"seg": {"miou": 45.0}}
    r[3].achieved = {"params_ratio": 0.45, "macs_ratio": 0.39}
    r[3].plan_hash, r[3].held_sha256 = "p3", "3" * 64
    r[3].bytes_up, r[3].bytes_up_scores, r[3].bytes_down, r[3].bytes_dense = 120, 40, 700, 400
    # 4: rejected while scoring (NaN scores); 5: its profile never decoded (no device id), failed later
    r[4].device_id, r[4].profile, r[4].tasks = "device-0004", profile("device-0004", ("seg",)), ("seg",)
    book.exclude(4, REJECTED, "score", "ImportanceReport: scores contain NaN | inf")
    r[4].bytes_up, r[4].bytes_down = 80, 10
    book.exclude(5, FAILED, "profile", "no reply within 30 s")
    return book


def settings(tmp_path: Path, text: str = "", **changes):
    path = tmp_path / "scenario.toml"
    path.write_text('[scenario]\nname = "unit"\ndevices = 5\nmin_devices = 2\n' + text)
    return dataclasses.replace(load_settings(path, out_dir=tmp_path / "out"), **changes)


def entries(book: Ledger) -> list[dict]:
    return sorted((report.device_entry(r, BASE) for r in book), key=lambda e: e["device_id"])


# ----------------------------------------------------------------------------------------- entries


def test_device_entries():
    e = {x["device_id"]: x for x in entries(ledger())}
    assert list(e) == ["device-0001", "device-0002", "device-0003", "device-0004", "node-5"]
    one = e["device-0001"]
    assert (one["status"], one["tasks"], one["budget_kind"], one["budget"]) == (OK, ["seg", "depth"], "params", 0.5)
    assert (one["params_ratio"], one["macs_ratio"]) == (0.4, 0.3)  # measured on the device
    assert one["delta_m"] == pytest.approx(-10.0) and one["delta_m_oneshot"] == pytest.approx(-22.5)
    assert one["scores_to_dense_bytes"] == pytest.approx(0.1) and one["eval_samples"] == 12
    assert one["weights_sha256"] == "1" * 64 and one["plan_hash"] == "p1" and one["device_class"] == "phone"
    assert e["device-0002"]["delta_m"] == pytest.approx(10.0) and e["device-0002"]["delta_m_oneshot"] == pytest.approx(-10)
    three = e["device-0003"]
    assert (three["params_ratio"], three["macs_ratio"]) == (0.45, 0.39)  # from the plan when not measured
    assert three["delta_m"] == pytest.approx(-5.0) and three["delta_m_oneshot"] == pytest.approx(-10.0)
    four = e["device-0004"]
    assert four["status"] == REJECTED and four["reason"].startswith("score: ImportanceReport: scores contain NaN")
    assert four["delta_m"] is None and four["delta_m_oneshot"] is None and four["scores_to_dense_bytes"] is None
    five = e["node-5"]  # no trusted device id: named by its node
    assert five["status"] == FAILED and five["tasks"] == [] and five["budget"] is None and five["device_class"] == ""


def test_delta_m_is_none_when_it_cannot_be_computed():
    record = ledger().records[1]
    assert report.device_delta(record, {}, BASE) is None  # no compact metrics
    record.metrics_dense = {"seg": {"miou": 0.0}, "depth": {"abs_err": 0.2}}  # no relative change from 0
    assert report.device_delta(record, record.metrics_compact, BASE) is None
    record.metrics_dense = {"seg": DENSE["seg"]}  # a task without dense metrics
    assert report.device_delta(record, record.metrics_compact, BASE) is None
    record.metrics_dense = {"seg": DENSE["seg"], "depth": {"abs_err": 0.2}}
    assert report.device_delta(record, record.metrics_compact, BASE) == pytest.approx(-10.0)


@pytest.mark.parametrize(("kind", "params", "macs", "budget", "within"), [
    ("params", 0.5, 0.9, 0.5, True),
    ("params", 0.5 + 1e-12, 0.1, 0.5, True),  # rounding noise is not a violation
    ("params", 0.51, 0.1, 0.5, False),
    ("macs", 0.9, 0.4, 0.4, True),
    ("macs", 0.1, 0.41, 0.4, False),
    ("params", None, 0.1, 0.5, False),  # unknown size: not counted as within budget
])
def test_within_budget_reads_the_budget_kind(kind, params, macs, budget, within):
    entry = {"budget_kind": kind, "params_ratio": params, "macs_ratio": macs, "budget": budget}
    assert report.within_budget(entry) is within


# ----------------------------------------------------------------------------------------- summary


def test_summary_counts_means_and_flags(tmp_path):
    s = settings(tmp_path)
    book = SimpleNamespace(builds={"p1": 1, "p2": 2, "p3": 3})
    summary = report.summarise(entries(ledger()), s, BASE, book, {"profile": 1.25, "score": 2.5})
    assert summary["scenario"] == "unit" and summary["status"] == "ok"
    assert (summary["devices_expected"], summary["devices_registered"]) == (5, 5)
    assert (summary["devices_ok"], summary["devices_rejected"], summary["devices_failed"]) == (3, 1, 1)
    assert (summary["task_subsets"], summary["distinct_plans"], summary["compact_models_built"]) == (3, 3, 3)
    assert summary["all_within_budget"] is True
    d = summary["delta_m"]  # over the ok devices only
    assert d["n"] == 3 and d["mean"] == pytest.approx((-10 + 10 - 5) / 3)
    assert (d["min"], d["max"], d["median"]) == (pytest.approx(-10), pytest.approx(10), pytest.approx(-5))
    assert summary["delta_m_oneshot"]["mean"] == pytest.approx((-22.5 - 10 - 10) / 3)
    assert summary["params_ratio"]["mean"] == pytest.approx((0.4 + 0.7 + 0.45) / 3)
    assert summary["bytes_up_scores"]["mean"] == pytest.approx((100 + 50 + 40) / 3)
    assert summary["bytes_up"]["n"] == 5  # traffic counts every registered device, excluded ones too
    assert summary["full_model_bytes"] == 4000 and summary["base_model"]["sha256"] == "ab" * 32
    assert summary["seconds_total"] == 3.75 and summary["reports_resumed"] == 0
    assert summary["privacy"]["mode"] == "none" and summary["privacy"]["epsilon"] is None


def test_one_device_over_budget_or_too_few_ok_devices(tmp_path):
    over = entries(ledger())
    over[1]["params_ratio"] = 0.71  # device-0002's budget is 0.7
    summary = report.summarise(over, settings(tmp_path), BASE, SimpleNamespace(builds={}), {})
    assert summary["all_within_budget"] is False and summary["status"] == "ok"
    strict = settings(tmp_path, min_devices=4)
    assert report.summarise(entries(ledger()), strict, BASE, SimpleNamespace(builds={}), {})["status"] == "failed"
    nobody = [e for e in entries(ledger()) if e["status"] != OK]
    empty = report.summarise(nobody, settings(tmp_path), BASE, SimpleNamespace(builds={}), {})
    assert empty["devices_ok"] == 0 and empty["delta_m"] is None and empty["status"] == "failed"
    assert empty["all_within_budget"] is True  # vacuous: no device was delivered a model


def test_noise_gives_every_reporting_device_an_epsilon(tmp_path):
    noisy = settings(tmp_path, "[scoring]\nclip_norm = 1.0\nnoise_multiplier = 2.0\n")
    assert report.device_epsilon(noisy, 2) > report.device_epsilon(noisy, 1) > 0  # more tasks, more spent
    assert report.device_epsilon(noisy, 0) is None and report.device_epsilon(settings(tmp_path), 2) is None


# ------------------------------------------------------------------------------------ files written


def test_write_report_files(tmp_path):
    s = settings(tmp_path)
    book = ledger()
    book.records[2].metrics_compact = {"normals": {"mean_angle": 27.0, "within_11": math.nan}}  # a NaN metric
    summary = report.write_report(book, s, BASE, SimpleNamespace(builds={"p1": 1, "p2": 2, "p3": 3}), {"plan": 0.5})
    out = tmp_path / "out"
    written = json.loads((out / "report.json").read_text())  # strict JSON: NaN became null
    assert written["summary"]["devices_ok"] == summary["devices_ok"] == 3
    assert written["summary"]["delta_m"]["mean"] == pytest.approx(-5 / 3)
    assert [d["device_id"] for d in written["devices"]] == ["device-0001", "device-0002", "device-0003",
                                                            "device-0004", "node-5"]
    assert written["devices"][1]["metrics_compact"]["normals"]["within_11"] is None
    assert all(d["dp_epsilon"] is None for d in written["devices"])  # no noise
    for plot in ("size_vs_delta.png", "fleet.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "# Federation report: unit"
    assert ("Status **ok**: 3 of 5 devices completed (1 rejected, 1 failed); 3 task subsets, 3 distinct plans, "
            "3 compact models built; all within budget: True.") in lines
    assert "Aggregation: weighted-mean." in lines and "Privacy: none" in text
    header = ("| device | class | tasks | budget | status | params (x dense) | MACs (x dense) | delta_m | as delivered "
              "| eval samples | bytes up | bytes down | reason |")
    rows = lines[lines.index(header) + 2:lines.index(header) + 7]
    assert rows == [
        "| device-0001 | phone | seg,depth | params 0.50 | ok | 0.400 | 0.300 | -10.00 | -22.50 | 12 | 300 | 2000 |  |",
        "| device-0002 | board | normals | params 0.70 | ok | 0.700 | 0.556 | 10.00 | -10.00 | 0 | 150 | 900 |  |",
        "| device-0003 | phone | seg | macs 0.40 | ok | 0.450 | 0.390 | -5.00 | -10.00 | 0 | 120 | 700 |  |",
        # a '|' in a reason would break the table: it is written as '/'
        "| device-0004 | phone | seg | params 0.50 | rejected | - | - | - | - | 0 | 80 | 10 | "
        "score: ImportanceReport: scores contain NaN / inf |",
        "| node-5 |  |  |  - | failed | - | - | - | - | 0 | 0 | 0 | profile: no reply within 30 s |",
    ]
    metrics = lines[lines.index("| device | seg | depth | normals |") + 2:]
    assert metrics[:4] == ["| device-0001 | 50 -> 45 | 0.2 -> 0.22 | - |", "| device-0002 | - | - | 30 -> 27 |",
                           "| device-0003 | 50 -> 47.5 | - | - |", ""]  # only devices that were evaluated
    assert any(line.startswith("delta_m (") and "mean -1.67" in line and "min -10.00, max 10.00" in line
               for line in lines), text


# ------------------------------------------------------------------------------ issue 14: feedback


def test_fleet_plot_has_labelled_axes_and_whole_device_counts():
    import matplotlib.pyplot as plt

    fig = report.fleet_figure(entries(ledger()))
    left, right = fig.axes[:2]
    assert (left.get_xlabel(), left.get_ylabel()) == ("task subset", "devices")
    assert (right.get_xlabel(), right.get_ylabel()) == ("status", "devices")
    for axis in (left, right):
        ticks = [t for t in axis.get_yticks() if axis.get_ylim()[0] <= t <= axis.get_ylim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert left.get_legend().get_title().get_text() == "budget"
    plt.close(fig)


def test_report_says_which_devices_never_registered_and_logs_a_summary_line(tmp_path, capsys):
    s = settings(tmp_path, devices=8)  # the scenario expects 8; 5 registered
    report.write_report(ledger(), s, BASE, SimpleNamespace(builds={"p1": 1, "p2": 2, "p3": 3}), {})
    text = (tmp_path / "out" / "report.md").read_text()
    assert ("3 of 5 devices completed (1 rejected, 1 failed; 3 of the 8 devices the scenario expects never "
            "registered)") in text
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith(report.SUMMARY_PREFIX)][-1]
    logged = json.loads(line[len(report.SUMMARY_PREFIX):])
    assert logged["devices_ok"] == 3 and logged["devices_expected"] == 8 and logged["status"] == "ok"
    assert logged["delta_m_mean"] == pytest.approx(-5 / 3) and logged["report"] == str((tmp_path / "out").resolve())


class _Reply:
    def __init__(self, reply_to: str) -> None:
        self.metadata = SimpleNamespace(reply_to_message_id=reply_to)
        self.content = None

    def has_error(self) -> bool:
        return False


class _TrickleGrid:
    """Answers one pushed message per pull, so a phase's replies arrive one after another."""

    def __init__(self) -> None:
        self.pushed: list[str] = []

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.message_id = f"m{len(self.pushed)}"
            self.pushed.append(m.metadata.message_id)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        waiting = [i for i in self.pushed if i in set(ids)]
        return [_Reply(waiting[0])] if waiting else []


def test_a_phase_advances_its_progress_once_per_device_as_replies_arrive(monkeypatch):
    import contextlib

    from server import exchange

    seen: list[tuple[int, str]] = []

    @contextlib.contextmanager
    def recording_bar(description, total, enabled=True, plain_lines=4):
        assert (description, total) == ("score", 3)
        yield lambda n=1, info="": seen.append((n, info))

    class _Message:
        def __init__(self, content, dst_node_id, **kw):
            self.content, self.metadata = content, SimpleNamespace(message_id="", dst_node_id=dst_node_id)

    monkeypatch.setattr(exchange, "progress_bar", recording_bar)
    monkeypatch.setattr(exchange, "Message", _Message)
    monkeypatch.setattr(exchange, "content_nbytes", lambda content: 0)
    monkeypatch.setattr(exchange, "POLL_SECONDS", 0.0)
    book = Ledger([1, 2, 3])
    replies = exchange.exchange(_TrickleGrid(), book, "score", "query.score", {1: None, 2: None, 3: None}, 30.0)
    assert sorted(replies) == [1, 2, 3]
    assert seen == [(1, "answered 1, excluded 0"), (1, "answered 2, excluded 0"), (1, "answered 3, excluded 0")]


def test_a_simulation_with_too_few_supernodes_fails_at_once(monkeypatch):
    from server import exchange

    class InMemoryGrid:  # the simulation engine's grid: every SuperNode exists before the ServerApp starts
        def get_node_ids(self):
            return [11, 12]

    class HttpGrid(InMemoryGrid):  # a deployment: SuperNodes may still be on their way
        pass

    monkeypatch.setattr(exchange, "SIMULATION_SETTLE_SECONDS", 0.0)
    start = time.monotonic()
    with pytest.raises(exchange.TooFewSuperNodes, match="2 SuperNodes but the scenario expects 20.*num-supernodes=20"):
        exchange.wait_for_nodes(InMemoryGrid(), expected=20, timeout=120)
    assert time.monotonic() - start < 5
    assert exchange.wait_for_nodes(HttpGrid(), expected=20, timeout=0.0) == [11, 12]  # waits out its timeout
