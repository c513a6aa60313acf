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


# ------------------------------------------------------------------ distributed differential privacy


def _dp_scenario(root: Path, base: Path, min_devices: int, z: float) -> Path:
    path = _scenario(root, base, secure=True)
    extra = (f'privacy = "distributed"\ndp_noise_multiplier = {z}\ndp_min_devices = {min_devices}\n'
             'dp_shrinkage = false\n')
    path.write_text(path.read_text().replace("[scoring]\n", "[scoring]\n" + extra))
    return path


def _run_spied(path: Path, out: Path) -> dict:
    """Run a scenario; keep the unmasked sum the server's private_mean gets and every aggregate_fit call."""
    import server.secagg
    from simulations.runner import run_scenario

    seen: dict = {"sum": None, "fits": 0}
    real_private, real_fit = server.secagg.private_mean, server.secagg.SumStrategy.aggregate_fit

    def spy_private(layout, total, contributors, shrinkage=True):
        seen["sum"] = (layout, np.array(total), contributors)
        return real_private(layout, total, contributors, shrinkage)

    def spy_fit(self, server_round, results, failures):
        seen["fits"] += 1
        return real_fit(self, server_round, results, failures)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server.secagg, "private_mean", spy_private)
        mp.setattr(server.secagg.SumStrategy, "aggregate_fit", spy_fit)
        seen["summary"] = run_scenario(path, out_dir=out)
    report = json.loads((out / "report.json").read_text())
    seen["devices"] = {d["device_id"]: d for d in report["devices"]}
    seen["privacy"] = report["summary"]["privacy"]
    seen["markdown"] = (out / "report.md").read_text()
    return seen


Z_E2E = 6.0  # the sum's noise std = 6 x dp_clip: large against the encoded scores (norm dp_clip per task)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg-dp")
    base = tiny_model_dir(root)
    seen = _run_spied(_dp_scenario(root, base, min_devices=3, z=Z_E2E), root / "out")
    seen["path"], seen["out"] = root / "scenario.toml", root / "out"
    return seen


@pytest.mark.slow
def test_distributed_dp_run_completes_with_the_calibrated_noise_in_the_sum(dp_run, tmp_path_factory):
    """Four devices (the NaN one refuses) each add N(0, (z C)^2 / 3): the unmasked sum's noise, measured
    against the noiseless sum of the same devices' encoded vectors, has std z C sqrt(4 / 3)."""
    from client.data import local_data
    from client.scoring import local_scores, mean_one
    from cut.messages import ScoringRequest
    from server.planning import BaseModel
    from server.privacy import distributed_epsilon
    from simulations.fleet import assign
    from simulations.scenario import load_scenario, resolve

    run = dp_run
    assert run["summary"]["devices_ok"] == 4, [d["reason"] for d in run["devices"].values()]
    layout, total, contributors = run["sum"]
    assert contributors == 4 and layout.dp.min_devices == 3 and layout.dp.transform == "fourth-root"
    assert layout.dp.clip == 0.1  # the default: every task vector is scaled to it
    assert layout.dp.share_std == pytest.approx(Z_E2E * 0.1 / math.sqrt(3))
    scenario = load_scenario(run["path"], out_dir=run["out"])
    base_model = BaseModel.load(scenario.settings.base_model_dir)
    scenario = resolve(scenario, base_model.card)
    s = scenario.settings.scoring
    clean = np.zeros(layout.size)
    for pid in range(len(DEVICES)):
        device = assign(scenario.fleet, pid, len(DEVICES))
        if device.device_id not in GOOD:
            continue
        tasks = base_model.canonical(device.tasks)
        request = ScoringRequest(base_model.model_id, base_model.sha256, tasks, s.criterion, s.num_batches,
                                 s.batch_size)
        data = local_data(device)
        model = base_model.model.decompose(list(tasks)).eval()
        scores = mean_one(local_scores(model, data, request, scenario.settings.seed * 100_003 + device.partition_id))
        used = min(s.num_batches * s.batch_size, data.num_train)
        weights = {t: min(1.0, used / layout.weight_scale) for t in scores}
        clean += layout.flatten(layout.dp.encode(scores, {t: layout.channels(t) for t in scores}), weights)
    noise = (total - clean)[:layout.score_size]
    expected = layout.dp.share_std * math.sqrt(4)
    assert layout.score_size > 1000
    assert np.std(noise) == pytest.approx(expected, rel=0.08), (np.std(noise), expected)
    assert abs(np.mean(noise)) < 4 * expected / math.sqrt(noise.size)
    np.testing.assert_allclose(total[layout.score_size:], clean[layout.score_size:], atol=1e-6)  # weights: exact
    # The report states the central epsilon with its assumptions; every device's epsilon is its own.
    privacy = run["privacy"]
    assert privacy["mode"] == "distributed" and privacy["releases"] == 1 and privacy["devices_in_release"] == 4
    assert privacy["epsilon"] == pytest.approx(distributed_epsilon(Z_E2E, 3, 1e-5), rel=1e-6)
    assert privacy["epsilon"] > distributed_epsilon(Z_E2E, 2, 1e-5)  # the worst device holds 3 tasks
    assert "honest-but-curious" in " ".join(privacy["assumptions"])
    assert "distributed DP" in run["markdown"]
    assert run["devices"]["device-0001"]["dp_epsilon"] == pytest.approx(distributed_epsilon(Z_E2E, 2, 1e-5))


@pytest.mark.slow
def test_distributed_dp_release_aborts_before_unmasking_with_too_few_devices(tmp_path):
    """dp_min_devices 5, but the NaN device refuses to send: 4 masked vectors, so the server never runs the
    unmask stage (the strategy never gets a sum), every device is excluded with the reason, no privacy
    is spent and the report says so."""
    base = tiny_model_dir(tmp_path)
    run = _run_spied(_dp_scenario(tmp_path, base, min_devices=5, z=Z_E2E), tmp_path / "out")
    assert run["fits"] == 0 and run["sum"] is None
    assert run["summary"]["devices_ok"] == 0
    for device_id in GOOD:
        assert "aborted before unmasking: 4 device(s) sent masked vectors" in run["devices"][device_id]["reason"]
    assert run["privacy"]["releases"] == 0 and run["privacy"]["epsilon"] == 0.0
    assert "aborted" in run["privacy"]["statement"]


def test_distributed_shares_sum_to_the_calibrated_noise():
    """n devices each adding N(0, (z C)^2 / n_min) to a vector: the sum's noise std is z C sqrt(n / n_min)
    (z C exactly at n = n_min), on the score coordinates only."""
    from client.scoring import distributed_share

    size, scores = 20_000, 19_997
    for n_min, n in ((10, 10), (10, 25), (100, 100)):
        share = 4.9 / math.sqrt(n_min)
        total = sum(distributed_share(np.zeros(size), scores, share, np.random.default_rng([n_min, n, i]))
                    for i in range(n))
        assert np.std(total[:scores]) == pytest.approx(4.9 * math.sqrt(n / n_min), rel=0.02)
        assert np.all(total[scores:] == 0)
    with pytest.raises(ValueError, match="share std"):
        distributed_share(np.zeros(3), 2, 0.0)


def test_distributed_noise_comes_from_os_entropy():
    """Two devices with the same inputs draw different noise (no seed travels: the layout has none)."""
    from client.scoring import distributed_share

    a = distributed_share(np.zeros(100), 100, 1.0)
    b = distributed_share(np.zeros(100), 100, 1.0)
    assert not np.allclose(a, b)
    layout = Layout.of({"seg": ["b"]}, {"b": 3}, 16, _dp())
    assert "seed" not in layout.to_json()


def _dp(**changes):
    from protocol.layout import DistributedNoise

    fields = {"transform": "fourth-root", "clip": 1.0, "share_std": 0.5, "min_devices": 3} | changes
    return DistributedNoise(**fields)


def test_distributed_layout_round_trip_and_refusals():
    layout = Layout.of({"seg": ["b", "s"]}, {"b": 3, "s": 2}, 16, _dp())
    assert Layout.from_json(layout.to_json()) == layout
    assert layout.clipping_range == pytest.approx(1.0 + 10 * 0.5) and layout.score_size == 5
    for bad, match in (({"transform": "cube"}, "transform"), ({"share_std": 0.0}, "share_std"),
                       ({"min_devices": 1}, "min_devices"), ({"clip": float("nan")}, "clip")):
        text = Layout.of({"seg": ["b"]}, {"b": 3}, 16, _dp(**bad)).to_json()
        with pytest.raises(ValidationError, match=match):
            Layout.from_json(text)


def test_encode_bounds_each_task_and_decode_inverts_it():
    """fourth-root of a mean-1 vector divided by sqrt(N) has norm <= 1 whatever the data (so clip 1 never
    clips); decode of the noiseless mean gives back the mean-1 scores / N (sum 1)."""
    rng = np.random.default_rng(3)
    dp = _dp()
    for shape in (0.05, 1.0, 50.0):
        raw = {"seg": {"b": rng.gamma(shape, size=300), "s": rng.gamma(shape, size=100)}}
        total = sum(float(v.sum()) for v in raw["seg"].values())
        mean1 = {"seg": {g: v * 400 / total for g, v in raw["seg"].items()}}
        u = dp.encode(mean1, {"seg": 400})
        norm = math.sqrt(sum(float((v ** 2).sum()) for v in u["seg"].values()))
        assert 0 < norm <= 1.0 + 1e-12
        back = dp.decode(np.concatenate([u["seg"]["b"], u["seg"]["s"]]), 400)
        np.testing.assert_allclose(back, np.concatenate([mean1["seg"]["b"], mean1["seg"]["s"]]) / 400, rtol=1e-9)
    clipped = _dp(transform="none").encode({"seg": {"b": np.array([3.0, 0.0, 0.0])}}, {"seg": 3})
    assert np.linalg.norm(clipped["seg"]["b"]) == pytest.approx(1.0)  # no transform: sqrt(3) > 1, clipped


def test_private_mean_recovers_the_ranking_from_the_noisy_sum():
    """Many devices with the same true scores, noise of std z C in the sum: the decoded mean ranks the
    channels like the truth, with or without shrinkage; shrinkage flattens pure noise to the group mean."""
    from server.secagg import private_mean

    rng = np.random.default_rng(5)
    n, n_min, z = 400, 400, 4.9
    dp = _dp(share_std=z / math.sqrt(n_min), min_devices=n_min)
    layout = Layout.of({"seg": ["b"]}, {"b": 200}, 16, dp)
    truth = rng.gamma(0.3, size=200)
    truth *= 200 / truth.sum()
    vector = layout.flatten(dp.encode({"seg": {"b": truth}}, {"seg": 200}), {"seg": 1.0})
    total = n * vector + rng.normal(0.0, dp.share_std * math.sqrt(n), size=layout.size) * (
        np.arange(layout.size) < layout.score_size)
    plain = private_mean(layout, total, n, shrinkage=False)["seg"]["b"]
    shrunk = private_mean(layout, total, n, shrinkage=True)["seg"]["b"]
    assert plain.sum() == pytest.approx(1.0, abs=1e-5) and shrunk.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.corrcoef(plain, truth)[0, 1] > 0.8
    assert np.corrcoef(shrunk, truth)[0, 1] > 0.8
    only_noise = private_mean(layout, np.where(np.arange(layout.size) < layout.score_size,
                                               rng.normal(0.0, dp.share_std * math.sqrt(n), size=layout.size),
                                               total), n)["seg"]["b"]
    assert np.ptp(only_noise) < 1e-6  # nothing distinguishable from the noise: every channel its group's mean
