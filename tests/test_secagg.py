"""Secure aggregation of importance scores (SecAgg+): the server only ever holds sums.

End to end, a small fleet runs on Flower's simulation engine with `[scoring] secure_aggregation = true`.
The ServerApp runs in this process, so the server side is observed directly: every reply the server
receives, what the legacy strategy is handed, the aggregate it plans from, and that the plain
aggregation (`server.aggregate.aggregate`) never runs. The reference is computed here, in-process, the
way each device scores in plain mode (same data, model, request and seed): the plain weighted mean of
those reports must equal the secure aggregate up to SecAgg+'s quantisation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_federation import scenario_file, tiny_model_dir

from cut.messages import ValidationError
from protocol.layout import Layout
from server.aggregate import aggregate, normalised
from server.settings import load_settings

DEVICES = {0: {"tasks": ["seg"]}, 1: {"tasks": ["depth", "normals"], "class": "small"},
           2: {"tasks": ["seg", "depth", "normals"]}, 3: {"tasks": ["seg", "normals"]},
           4: {"tasks": ["seg", "depth"], "misbehave": "nan"}}
GOOD = ["device-0000", "device-0001", "device-0002", "device-0003"]


def _scenario(root: Path, base: Path, secure: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = scenario_file(root, base, rounds=0, devices=DEVICES)
    extra = f'secure_aggregation = {str(secure).lower()}\n'
    path.write_text(path.read_text().replace("[scoring]\n", "[scoring]\n" + extra))
    return path


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    """What the server saw in a secure run, the report's device entries, and the scenario file."""
    import server.app
    import server.secagg
    from simulations.runner import run_scenario

    root = tmp_path_factory.mktemp("secagg")
    base = tiny_model_dir(root)
    path = _scenario(root, base, secure=True)
    seen: dict = {"aggregate_calls": [], "replies": [], "strategy_vectors": [], "secure_mean": None}
    real_mean = server.secagg.weighted_mean
    real_send = server.secagg.MeteredGrid.send_and_receive
    real_fit = server.secagg.SumStrategy.aggregate_fit

    def spy_aggregate(*args, **kwargs):
        seen["aggregate_calls"].append(args)
        raise AssertionError("the plain aggregation ran in secure mode")

    def spy_mean(layout, total):
        seen["secure_mean"] = (layout, real_mean(layout, total))
        return seen["secure_mean"][1]

    def spy_send(self, messages, *, timeout=None):
        replies = real_send(self, messages, timeout=timeout)
        seen["replies"].append([(self.ledger.records[r.metadata.src_node_id].device_id, r) for r in replies])
        return replies

    def spy_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        seen["strategy_vectors"] += [parameters_to_ndarrays(res.parameters)[0] for _, res in results]
        return real_fit(self, server_round, results, failures)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server.app, "aggregate", spy_aggregate)
        mp.setattr(server.secagg, "weighted_mean", spy_mean)
        mp.setattr(server.secagg.MeteredGrid, "send_and_receive", spy_send)
        mp.setattr(server.secagg.SumStrategy, "aggregate_fit", spy_fit)
        seen["summary"] = run_scenario(path, out_dir=root / "out")
    report = json.loads((root / "out" / "report.json").read_text())
    seen["devices"] = {d["device_id"]: d for d in report["devices"]}
    seen["path"], seen["out"] = path, root / "out"
    return seen


@pytest.fixture(scope="module")
def plain_reports(secure_run):
    """device id -> (scores, weights): each good device's plain-mode report, computed here as it would
    compute it (client.scoring on its data, its decomposed base model, the server's request and seed)."""
    from client.data import local_data
    from client.scoring import local_scores, mean_one, privatise
    from cut.messages import PrivacySettings, ScoringRequest
    from server.planning import BaseModel
    from simulations.fleet import assign
    from simulations.scenario import load_scenario, resolve

    scenario = load_scenario(secure_run["path"], out_dir=secure_run["out"])
    base = BaseModel.load(scenario.settings.base_model_dir)
    scenario = resolve(scenario, base.card)
    settings = scenario.settings
    s = settings.scoring
    reports = {}
    for pid in range(len(DEVICES)):
        device = assign(scenario.fleet, pid, len(DEVICES))
        if device.device_id not in GOOD:
            continue
        tasks = base.canonical(device.tasks)
        request = ScoringRequest(base.model_id, base.sha256, tasks, s.criterion, s.num_batches, s.batch_size,
                                 PrivacySettings(clip_norm=s.clip_norm, noise_multiplier=s.noise_multiplier))
        data = local_data(device)
        model = base.model.decompose(list(tasks)).eval()
        seed = settings.seed * 100_003 + device.partition_id
        scores = privatise(mean_one(local_scores(model, data, request, seed)), request.privacy)
        used = min(s.num_batches * s.batch_size, data.num_train)
        reports[device.device_id] = (scores, {t: float(min(used, data.num_train)) for t in scores})
    return reports


@pytest.mark.slow
def test_secure_run_completes_and_equals_the_plain_weighted_mean(secure_run, plain_reports):
    run = secure_run
    assert run["summary"]["devices_ok"] == 4, [d["reason"] for d in run["devices"].values()]
    assert run["summary"]["all_within_budget"]
    # The NaN device refused to send (its own validation): the server never saw the NaN.
    assert run["devices"]["device-0004"]["status"] == "failed"
    assert "finite and non-negative" in run["devices"]["device-0004"]["reason"]
    plain_agg = aggregate(list(plain_reports.values()), "weighted-mean")
    layout, secure_agg = run["secure_mean"]
    assert set(secure_agg) == set(plain_agg) == {"seg", "depth", "normals"}
    n = len(GOOD)  # devices in the sum
    step = 2 * layout.clipping_range / 2 ** math.floor(math.log2((2**32 - 1) / n))  # one quantisation step
    errors = {}
    for task, groups in plain_agg.items():
        p = np.concatenate([groups[g] for g in groups]).astype(np.float64)
        s = np.concatenate([secure_agg[task][g] for g in groups]).astype(np.float64)
        weight = sum(w[task] for scores, w in plain_reports.values() if task in scores) / layout.weight_scale
        # Worst case: every device's value rounded by a full step (plus float32 rounding of the scores).
        bound = n * step / (weight * layout.channels(task)) + 1e-6 * p.max()
        errors[task] = float(np.abs(s - p).max() / p.mean())
        assert np.abs(s - p).max() <= bound, (task, np.abs(s - p).max(), bound)
        assert s.sum() == pytest.approx(1.0, abs=1e-4)  # like a plain per-task normalised mean
    assert max(errors.values()) < 1e-4, errors  # relative to the mean score


@pytest.mark.slow
def test_no_individual_report_reaches_the_servers_aggregation(secure_run, plain_reports):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    secure = secure_run
    assert secure["aggregate_calls"] == []  # the plain aggregation never ran
    layout, secure_agg = secure["secure_mean"]
    # Every device's plain vector, laid out and quantised as SecAgg+ would before masking.
    contributions = list(plain_reports.values())
    c, q = layout.clipping_range, 2 ** math.floor(math.log2((2**32 - 1) / 4))
    plain_flat, plain_vectors = [], []
    for scores, weights in contributions:
        mean1 = {t: {g: v * layout.channels(t) for g, v in groups.items()} for t, groups in normalised(scores).items()}
        plain_flat.append(layout.flatten(mean1, {t: w / layout.weight_scale for t, w in weights.items()}))
        plain_vectors.append(np.round((plain_flat[-1] + c) * q / (2 * c)))
    masked = {}
    for stage in secure["replies"]:
        for device_id, reply in stage:
            if reply.has_error():
                continue
            assert all(len(r) == 0 for r in reply.content.array_records.values())  # fitres.parameters cleared
            cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
            if Key.MASKED_PARAMETERS in cfg:
                vecs = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
                masked[device_id] = vecs[1].astype(np.float64)  # vecs[0] is the masked weight factor
            fit_metrics = reply.content.config_records.get("fitres.metrics")
            assert not fit_metrics  # nothing else travels in the clear
    assert sorted(masked) == ["device-0000", "device-0001", "device-0002", "device-0003"]
    for device_id, vec in masked.items():
        assert vec.shape == (layout.size,)
        assert np.mean(vec <= q) < 0.5  # uniform over the modulus; a quantised plain vector is all <= q
        for plain_vec in plain_vectors:
            assert np.mean(np.abs(vec - plain_vec) <= 1e-3 * q) < 0.01, device_id
            assert abs(np.corrcoef(vec, plain_vec)[0, 1]) < 0.2, device_id
    # The legacy strategy only ever holds the unmasked aggregate (the same vector for every device).
    vectors = secure["strategy_vectors"]
    assert len(vectors) == 4 and all(np.array_equal(v, vectors[0]) for v in vectors)
    assert all(np.abs(vectors[0] - v).max() > 0.1 for v in plain_flat)  # the mean of 4, no device's own


@pytest.mark.slow
def test_secure_uplink_is_counted(secure_run):
    layout, _ = secure_run["secure_mean"]
    for device_id in GOOD:
        entry = secure_run["devices"][device_id]
        assert 8 * layout.size < entry["bytes_up_scores"] <= entry["bytes_up"]  # at least the int64 masked vector
        assert entry["report_source"] == "secure-sum"


# ------------------------------------------------------------------------------ pieces, no Flower


def _layout() -> Layout:
    return Layout.of({"seg": ["b", "s"], "depth": ["b", "d"]}, {"b": 3, "s": 2, "d": 1}, weight_scale=16)


def test_layout_sums_give_the_plain_weighted_mean():
    """Summing the devices' flat vectors and dividing per task is exactly aggregate(..., 'weighted-mean')."""
    from server.secagg import weighted_mean

    rng = np.random.default_rng(0)
    layout = _layout()
    devices = [({"seg": {"b": rng.random(3), "s": rng.random(2)}}, {"seg": 16.0}),
               ({"seg": {"b": rng.random(3), "s": rng.random(2)}, "depth": {"b": rng.random(3), "d": rng.random(1)}},
                {"seg": 4.0, "depth": 8.0})]
    total = np.zeros(layout.size)
    for scores, weights in devices:
        mean1 = {t: {g: v * layout.channels(t) for g, v in gs.items()} for t, gs in normalised(scores).items()}
        total += layout.flatten(mean1, {t: w / layout.weight_scale for t, w in weights.items()})
    secure = weighted_mean(layout, total)
    plain = aggregate(devices, "weighted-mean")
    assert set(secure) == set(plain)
    for task in plain:
        for g in plain[task]:
            np.testing.assert_allclose(secure[task][g], plain[task][g], rtol=1e-6)
    assert layout.to_json() == Layout.from_json(layout.to_json()).to_json()
    assert layout.clipping_range == 5.0 and layout.size == 5 + 4 + 2


def test_layout_refuses_what_does_not_fit():
    layout = _layout()
    ok = {"seg": {"b": np.ones(3), "s": np.ones(2)}}
    assert layout.flatten(ok, {"seg": 0.5})[-2:].tolist() == [2.5, 0.0]  # weights x clipping range: seg, depth
    with pytest.raises(ValidationError, match="other groups"):
        layout.flatten({"seg": {"b": np.ones(3)}}, {"seg": 1.0})
    with pytest.raises(ValidationError, match="channels"):
        layout.flatten({"seg": {"b": np.ones(4), "s": np.ones(2)}}, {"seg": 1.0})
    with pytest.raises(ValidationError, match="no task"):
        layout.flatten({"normals": {"b": np.ones(3)}}, {})
    with pytest.raises(ValidationError, match="finite"):
        layout.flatten({"seg": {"b": np.array([1.0, np.nan, 1.0]), "s": np.ones(2)}}, {"seg": 1.0})
    with pytest.raises(ValidationError, match="weight"):
        layout.flatten(ok, {"seg": 3.0})
    with pytest.raises(ValidationError, match="layout"):
        Layout.from_json("{not json")


def test_protocol_parameters():
    from server.secagg import quantization_range, shares

    for n in (2, 3, 5, 20, 1000, 5000):
        q = quantization_range(n)
        assert n * q < 2**32 and q <= 2**30 and 2 * n * q >= 2**32 or q == 2**30
        num_shares, threshold = shares(n)
        k = n if isinstance(num_shares, float) else num_shares
        assert 2 <= threshold <= k <= n and threshold > k / 2


@pytest.mark.parametrize("conflict", ['aggregation = "median"', 'aggregation = "trimmed-mean"', "server_clip = 2.0",
                                      "personalisation"])
def test_secure_aggregation_refuses_what_needs_individual_reports(tmp_path, conflict):
    text = "[scoring]\nsecure_aggregation = true\n"
    if conflict == "personalisation":
        text += "[planning]\npersonalisation = 0.5\n"
    else:
        text += conflict + "\n"
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="secure_aggregation"):
        load_settings(path)
    path.write_text("[scoring]\nsecure_aggregation = true\n")
    assert load_settings(path).scoring.secure_aggregation
