"""Privacy of the scores: the accountant (server.privacy), the sensitivity it relies on, the report's
privacy fields and the `cutfl simulate` privacy flags. In process, no Flower run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from client.scoring import mean_one, privatise
from cut.importance import validate_scores
from cut.messages import PrivacySettings
from server import privacy
from server.privacy import (
    analytic_delta,
    analytic_epsilon,
    gaussian_rdp,
    local_epsilon,
    noise_for_epsilon,
    privacy_summary,
    rdp_epsilon,
    rdp_to_epsilon,
    sigma_of,
)
from server.settings import load_settings
from simulations.scenario import fleet_max_tasks, load_scenario

# ---------------------------------------------------------------------------------------- accountant


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_analytic_gaussian_matches_known_values():
    # Balle & Wang 2018: for (1, 1e-5)-DP the analytic Gaussian mechanism needs sigma = 3.73 (the classical
    # bound sqrt(2 ln(1.25 / delta)) / epsilon asks for 4.84).
    assert analytic_epsilon(3.7306, 1e-5) == pytest.approx(1.0, abs=2e-3)
    assert math.sqrt(2 * math.log(1.25 / 1e-5)) == pytest.approx(4.8448, abs=1e-3)
    # delta(0) of a mu-GDP mechanism (mu = 1 / sigma) is 2 Phi(mu / 2) - 1 (Dong, Roth & Su 2019)
    for sigma in (0.5, 1.0, 3.0):
        assert analytic_delta(0.0, sigma) == pytest.approx(2 * _phi(0.5 / sigma) - 1, rel=1e-9)
    # and the curve itself, at a point: Phi(1/(2s) - e s) - e^e Phi(-1/(2s) - e s)
    s, e = 2.0, 0.7
    assert analytic_delta(e, s) == pytest.approx(_phi(0.5 / s - e * s) - math.exp(e) * _phi(-0.5 / s - e * s))


def test_rdp_matches_closed_forms_and_brackets_the_exact_value():
    # Mironov 2017: RDP(alpha) = alpha / (2 sigma^2); with the classic conversion the optimum over alpha is the
    # zCDP bound rho + 2 sqrt(rho ln(1/delta)), rho = 1 / (2 sigma^2). The improved conversion is tighter, and
    # no bound can beat the exact (analytic) epsilon.
    np.testing.assert_allclose(gaussian_rdp(np.array([2.0, 10.0]), 2.0), [0.25, 1.25])
    for sigma, delta in ((1.0, 1e-5), (3.0, 1e-6), (0.7, 1e-3)):
        rho = 1 / (2 * sigma**2)
        zcdp = rho + 2 * math.sqrt(rho * math.log(1 / delta))
        exact = analytic_epsilon(sigma, delta)
        rdp = rdp_epsilon(sigma, delta)
        assert exact < rdp < zcdp
        assert rdp / exact < 1.2  # one Gaussian release: RDP is only slightly loose
    # the conversion formula at one order (Balle et al. 2020): rdp + log((a-1)/a) - (log d + log a)/(a-1)
    eps, order = rdp_to_epsilon(np.array([8.0]), np.array([1.0]), 1e-5)
    assert order == 8.0
    assert eps == pytest.approx(1.0 + math.log(7 / 8) - (math.log(1e-5) + math.log(8)) / 7)
    # k compositions = one mechanism with sigma / sqrt(k)
    assert rdp_epsilon(2.0, 1e-5, compositions=4) == pytest.approx(rdp_epsilon(1.0, 1e-5), rel=1e-6)


def test_epsilon_is_monotone_and_noise_for_epsilon_inverts_it():
    zs = [0.5, 1.0, 2.0, 4.0, 8.0]
    for k in (1, 2, 3):
        eps = [local_epsilon(z, k, 1e-5) for z in zs]
        assert all(a > b for a, b in zip(eps, eps[1:], strict=False))  # more noise, less epsilon
    assert local_epsilon(2.0, 1, 1e-5) < local_epsilon(2.0, 2, 1e-5) < local_epsilon(2.0, 3, 1e-5)  # more tasks
    assert local_epsilon(2.0, 3, 1e-3) < local_epsilon(2.0, 3, 1e-7)  # smaller delta, larger epsilon
    assert local_epsilon(0.0, 3, 1e-5) == math.inf
    for target in (0.5, 2.0, 8.0):
        for method in ("rdp", "analytic"):
            z = noise_for_epsilon(target, 3, 1e-5, method)
            assert local_epsilon(z, 3, 1e-5, method) == pytest.approx(target, rel=1e-6)
            assert local_epsilon(z, 3, 1e-5, method) <= target * (1 + 1e-9)
    assert noise_for_epsilon(2.0, 3, 1e-5, "analytic") < noise_for_epsilon(2.0, 3, 1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        noise_for_epsilon(0.0, 1, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        local_epsilon(1.0, 1, 0.0)


# --------------------------------------------------------------------------------------- sensitivity


def test_sensitivity_of_clipped_non_negative_vectors_is_sqrt2_clip():
    rng = np.random.default_rng(0)
    clip = 3.0
    settings = PrivacySettings(clip_norm=clip)
    vectors = []
    for _ in range(200):
        raw = rng.gamma(0.3, 1.0, size=12) * rng.integers(0, 2, size=12)  # non-negative, sparse
        raw[rng.integers(0, 12)] += 1.0
        clipped = privatise({"t": {"g": raw.astype(np.float32)}}, settings)["t"]["g"]
        assert np.linalg.norm(clipped) <= clip * (1 + 1e-6)
        assert (clipped >= 0).all()
        vectors.append(clipped.astype(np.float64))
    worst = max(np.linalg.norm(a - b) for a in vectors for b in vectors)
    assert worst <= math.sqrt(2) * clip * (1 + 1e-6)
    # attained by disjoint supports; arbitrary signs would reach 2 C, hence the non-negativity matters
    e1, e2 = np.eye(12)[0] * clip, np.eye(12)[1] * clip
    assert np.linalg.norm(e1 - e2) == pytest.approx(math.sqrt(2) * clip)
    assert np.linalg.norm(e1 - (-e1)) == pytest.approx(2 * clip)
    # k task vectors: one mechanism with sensitivity sqrt(2 k) C, noise z C
    assert sigma_of(3.0, 3) == pytest.approx(3.0 / math.sqrt(6))


def test_the_device_path_is_non_negative_before_clipping():
    # cut.importance validates every criterion's scores >= 0; per-task normalisation keeps them so
    with pytest.raises(ValueError, match="negative"):
        validate_scores({"g": np.array([1.0, -0.1])}, {"g": 2})
    scores = mean_one({"seg": {"a": np.array([0.0, 2.0, 1.0]), "b": np.array([3.0])}})
    assert all((v >= 0).all() for v in scores["seg"].values())
    noisy = privatise(scores, PrivacySettings(clip_norm=1.0, noise_multiplier=5.0), np.random.default_rng(3))
    assert all((v >= 0).all() for v in noisy["seg"].values())  # clamped after the noise: post-processing
    assert any((v == 0).any() for v in noisy["seg"].values())  # ... and the clamp did bite at this noise


# ------------------------------------------------------------------------------------- noise (scale, source)


def test_noise_std_is_noise_multiplier_times_clip_norm():
    """Before clamping, the noise is N(0, (z C)^2) per coordinate. Measured where the clamp cannot bite:
    every coordinate of a task sits at C / sqrt(n) (norm exactly C, not clipped) and the noise std is a
    tenth of that, so max(x + noise, 0) = x + noise with probability 1 - 1e-23 per coordinate. 160k draws:
    the std estimate's relative standard error is 1 / sqrt(2 N) = 0.18%, the tolerance 2%."""
    clip, n, tasks = 3.0, 16, 10_000
    offset = clip / math.sqrt(n)  # 0.75
    for z in (0.025, 0.02):  # std 0.075 and 0.06: offset / std = 10 and 12.5
        scores = {f"t{i}": {"g": np.full(n, offset, dtype=np.float32)} for i in range(tasks)}
        out = privatise(scores, PrivacySettings(clip_norm=clip, noise_multiplier=z), np.random.default_rng(11))
        noise = np.concatenate([out[t]["g"].astype(np.float64) for t in scores]) - np.float32(offset)
        assert noise.size == n * tasks and (noise + offset > 0).all()  # the clamp never bit
        assert noise.std() == pytest.approx(z * clip, rel=0.02), (z, noise.std())
        assert abs(noise.mean()) < 5 * z * clip / math.sqrt(noise.size)  # centred
        # independent per coordinate and per task: no correlation between neighbours
        assert abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]) < 0.02


def test_noise_std_at_a_privacy_grade_multiplier_on_zero_scores():
    """At z = 1.5 (what an epsilon of a few asks for) on all-zero scores the clamp keeps max(noise, 0): a
    half-normal, where P(0) = 1/2 and E[out^2] = (z C)^2 / 2. 200k draws; tolerances are > 10 standard errors."""
    clip, z = 2.0, 1.5
    scores = {f"t{i}": {"a": np.zeros(120, np.float32), "b": np.zeros(80, np.float32)} for i in range(1000)}
    out = privatise(scores, PrivacySettings(clip_norm=clip, noise_multiplier=z), np.random.default_rng(5))
    values = np.concatenate([np.concatenate([out[t]["a"], out[t]["b"]]) for t in scores]).astype(np.float64)
    assert values.size == 200_000 and (values >= 0).all()
    assert (values == 0).mean() == pytest.approx(0.5, abs=0.012)
    assert math.sqrt(2 * (values**2).mean()) == pytest.approx(z * clip, rel=0.02)
    assert values.mean() == pytest.approx(z * clip / math.sqrt(2 * math.pi), rel=0.02)  # half-normal mean


def test_clipping_scales_a_long_vector_to_clip_norm_without_noise():
    rng = np.random.default_rng(0)
    scores = {"seg": {"a": rng.random(300).astype(np.float32) * 4, "b": rng.random(7).astype(np.float32)}}
    out = privatise(scores, PrivacySettings(clip_norm=2.5))
    flat_in = np.concatenate([scores["seg"]["a"], scores["seg"]["b"]]).astype(np.float64)
    flat_out = np.concatenate([out["seg"]["a"], out["seg"]["b"]]).astype(np.float64)
    assert np.linalg.norm(flat_out) == pytest.approx(2.5, rel=1e-6)
    np.testing.assert_allclose(flat_out, flat_in * 2.5 / np.linalg.norm(flat_in), rtol=1e-6)  # direction kept
    assert privatise(scores, PrivacySettings()) is scores  # clip 0: off, untouched


def test_an_explicit_rng_reproduces_noise_locally():
    scores = {"seg": {"g": np.full(50, 0.1, np.float32)}}
    settings = PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)
    a = privatise(scores, settings, np.random.default_rng(4))["seg"]["g"]
    b = privatise(scores, settings, np.random.default_rng(4))["seg"]["g"]
    c = privatise(scores, settings, np.random.default_rng(5))["seg"]["g"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_the_device_draws_fresh_noise_for_every_scoring(monkeypatch):
    """The ScoringRequest carries no seed, and the device's scoring (plain and secure) draws its noise from
    fresh OS entropy: the same request, model, data and scoring seed, with the global numpy and torch seeds
    reset identically, give different reports. A server cannot make a device repeat its noise."""
    import torch

    import client.scoring
    import client.secure
    from client.device import Device
    from cut import wire
    from cut.messages import Budget, ScoringRequest
    from protocol.layout import Layout
    from protocol.phases import DataSpec

    raw = {"seg": {"g1": np.linspace(0.1, 2.0, 24, dtype=np.float32), "g2": np.ones(8, np.float32)}}
    monkeypatch.setattr(client.scoring, "local_scores", lambda model, data, request, seed: raw)
    monkeypatch.setattr(client.secure, "local_scores", lambda model, data, request, seed: raw)
    device = Device("phone-1", 0, 1, ("seg",), Budget("params", 0.5), "phone", DataSpec())
    data = SimpleNamespace(num_train=40)
    request = ScoringRequest("m", "0" * 64, ("seg",), "taylor", 2, 8,
                             PrivacySettings(clip_norm=1.0, noise_multiplier=2.0))
    request = wire.decode_request(wire.encode_request(request))  # what the device actually holds
    layout = Layout.of({"seg": ["g1", "g2"]}, {"g1": 24, "g2": 8}, 100.0)

    def plain() -> np.ndarray:
        np.random.seed(0)
        torch.manual_seed(0)
        _, arrays = client.scoring.score_and_encode(device, None, data, request, "float32", seed=123)
        return np.concatenate([arrays["seg/g1"], arrays["seg/g2"]])

    def secure() -> np.ndarray:
        np.random.seed(0)
        torch.manual_seed(0)
        return client.secure.secure_vector(device, None, data, request, layout, seed=123)

    for scoring in (plain, secure):
        first, second = scoring(), scoring()
        assert first.shape == second.shape == (33,) if scoring is secure else (32,)
        assert np.isfinite(first).all() and np.isfinite(second).all()
        assert not np.allclose(first, second), scoring.__name__
    # without noise the same inputs give the same report: the difference above is the noise alone
    quiet = wire.decode_request(wire.encode_request(
        ScoringRequest("m", "0" * 64, ("seg",), "taylor", 2, 8, PrivacySettings(clip_norm=1.0))))
    request = quiet
    np.testing.assert_array_equal(plain(), plain())
    np.testing.assert_array_equal(secure(), secure())


def test_fleet_max_tasks_covers_subsets_and_overrides():
    assert fleet_max_tasks(load_scenario("default").fleet) == 3
    one = SimpleNamespace(tasks=("seg", "depth"), overrides={}, all_subsets=lambda: ((("seg",), 1.0),))
    assert fleet_max_tasks(one) == 1
    one.overrides = {4: {"tasks": ["seg", "depth"]}}
    assert fleet_max_tasks(one) == 2


# ------------------------------------------------------------------------------------------- report


def test_privacy_summary_states_epsilon_of_the_worst_device():
    out = privacy_summary(2.0, 3.0, 1e-5, [1, 2, 3, 1, 0])
    assert out["mode"] == "local" and out["max_tasks_per_device"] == 3
    assert out["epsilon"] == pytest.approx(local_epsilon(3.0, 3, 1e-5))
    assert out["epsilon_analytic"] < out["epsilon"]
    assert set(out["epsilon_by_tasks"]) == {"1", "2", "3"}
    assert "whole local dataset" in out["unit"] and "sqrt(2)" in out["sensitivity"]
    assert len(out["assumptions"]) == len(privacy.ASSUMPTIONS)
    none = privacy_summary(2.0, 0.0, 1e-5, [3])
    assert none["mode"] == "none" and none["epsilon"] is None and "clipped only" in none["statement"]
    assert "secure_aggregation" in privacy_summary(2.0, 3.0, 1e-5, [1], secure_aggregation=True)


def _entry(tasks, status="ok"):
    return {"status": status, "tasks": list(tasks), "plan_hash": "p" + "".join(tasks), "params_ratio": 0.5,
            "macs_ratio": 0.5, "budget_kind": "params", "budget": 0.5, "delta_m": -1.0, "delta_m_oneshot": -2.0,
            "bytes_up_scores": 100, "report_source": "live", "scores_to_dense_bytes": 0.001,
            "uplink_to_dense_bytes": 0.002, "bytes_up": 200,
            "bytes_down": 300, "device_id": "d" + "".join(tasks), "device_class": "c", "reason": "",
            "dp_epsilon": None, "metrics_dense": {}, "metrics_compact": {}, "eval_samples": 0}


def test_report_summary_and_markdown_carry_the_privacy_fields():
    from server import report

    base = SimpleNamespace(card={"weights_bytes": 1}, directory="base", model_id="m", sha256="s")
    book = SimpleNamespace(builds={})
    entries = [_entry(["seg"]), _entry(["seg", "depth", "normals"]), _entry([], status="rejected")]
    noisy = load_scenario("default", clip_norm=5.0, epsilon=2.0, aggregation="trimmed-mean", server_clip=1.5).settings
    for e in entries:
        e["dp_epsilon"] = report.device_epsilon(noisy, len(e["tasks"]))
    assert entries[1]["dp_epsilon"] == pytest.approx(2.0, rel=1e-6) and entries[0]["dp_epsilon"] < 2.0
    assert entries[2]["dp_epsilon"] is None
    summary = report.summarise(entries, noisy, base, book, {"plan": 1.0})
    p = summary["privacy"]
    assert p["mode"] == "local" and p["epsilon"] == pytest.approx(2.0, rel=1e-6) and p["delta"] == 1e-5
    assert summary["aggregation"] == "trimmed-mean" and summary["trim_fraction"] == 0.1
    assert summary["server_clip"] == 1.5
    text = report.markdown({"summary": summary, "devices": entries})
    assert "Privacy:" in text and "epsilon 2" in text and "whole local dataset" in text
    assert "trimmed-mean (trim 0.1), server clip 1.5" in text
    json.dumps(report._finite({"summary": summary}), allow_nan=False)
    plain = report.summarise(entries, load_settings("default"), base, book, {"plan": 1.0})
    assert plain["privacy"]["mode"] == "none" and plain["privacy"]["epsilon"] is None
    assert "Privacy: none" in report.markdown({"summary": plain, "devices": entries})


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, fragment", [
    (["--clip-norm", "-1"], "--clip-norm: '-1' must be >= 0"),
    (["--clip-norm", "abc"], "is not a number"),
    (["--noise-multiplier", "inf"], "not a finite number"),
    (["--epsilon", "0"], "must be > 0"),
    (["--epsilon", "2", "--noise-multiplier", "1"], "not allowed with"),
    (["--aggregation", "mode"], "invalid choice"),
    (["--trim-fraction", "0.5"], "in [0, 0.5)"),
    (["--server-clip", "-2"], "must be >= 0"),
    (["--noise-multiplier", "1"], "needs clip_norm > 0"),
    (["--epsilon", "2"], "needs scoring.clip_norm > 0"),
])
def test_simulate_flags_fail_with_one_readable_line(args, fragment, capsys):
    from cutfl.cli import main

    try:
        code = main(["simulate", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and fragment in err[0], err


def test_simulate_flags_reach_the_settings(monkeypatch, capsys):
    import simulations.runner
    from cutfl import simulate_command as cli
    from cutfl.cli import main
    from server.settings import AGGREGATIONS

    assert cli.AGGREGATIONS == AGGREGATIONS
    seen = {}

    def fake_run(scenario, **kwargs):
        seen.update(kwargs)
        settings = load_scenario(scenario, **kwargs["scoring"]).settings
        seen["settings"] = settings
        return {"scenario": "default", "status": "ok", "devices_ok": 1, "devices_rejected": 0, "devices_failed": 0,
                "distinct_plans": 1, "all_within_budget": True, "seconds_total": 0.0, "delta_m": None,
                "scores_to_dense_bytes": None, "privacy": {"epsilon": 4.0}}

    monkeypatch.setattr(simulations.runner, "run_scenario", fake_run)
    assert main(["simulate", "--clip-norm", "20", "--epsilon", "4", "--aggregation", "trimmed-mean",
                 "--trim-fraction", "0.2", "--server-clip", "1.5"]) == 0
    s = seen["settings"].scoring
    assert (s.clip_norm, s.aggregation, s.trim_fraction, s.server_clip) == (20.0, "trimmed-mean", 0.2, 1.5)
    assert s.noise_multiplier == pytest.approx(noise_for_epsilon(4.0, 3, s.dp_delta))
    assert json.loads(capsys.readouterr().out)["dp_epsilon"] == 4.0


# ------------------------------------------------------------------ distributed DP: dp-accounting


def test_dp_accounting_matches_the_closed_form_of_the_analytic_gaussian():
    """Balle & Wang 2018: sigma 3.73 gives (1, 1e-5); dp-accounting's PLD accountant agrees with the closed
    form, also for compositions (m Gaussians of ratio s = one of ratio s / sqrt(m)); its RDP accountant is
    an upper bound, equal to the hand-written RDP one."""
    assert privacy.library_epsilon(3.73, 1, 1e-5) == pytest.approx(1.0, abs=1e-3)
    assert privacy.library_epsilon(3.73, 1, 1e-5) == pytest.approx(analytic_epsilon(3.73, 1e-5), rel=1e-4)
    for s, count in ((3.73, 1), (2.0, 3), (6.0, 9), (10.0, 30)):
        pld = privacy.library_epsilon(s, count, 1e-5)
        exact = analytic_epsilon(s / math.sqrt(count), 1e-5)
        assert pld == pytest.approx(exact, rel=1e-3), (s, count)
        assert pld >= exact - 1e-9  # PLD is pessimistic: never below the exact value
        rdp = privacy.library_epsilon(s, count, 1e-5, "rdp")
        assert rdp > pld and rdp == pytest.approx(rdp_epsilon(s / math.sqrt(count), 1e-5), rel=2e-3)
    with pytest.raises(ValueError, match="accountant"):
        privacy.library_epsilon(1.0, 1, 1e-5, "moments")


def test_distributed_noise_for_epsilon_is_confirmed_by_the_library_and_counts_releases():
    for eps in (0.5, 1.0, 2.0, 4.0, 8.0):
        z = privacy.distributed_noise_for_epsilon(eps, 3, 1e-5)
        spent = privacy.distributed_epsilon(z, 3, 1e-5)
        assert spent <= eps and spent == pytest.approx(eps, rel=2e-3), (eps, z, spent)
        assert privacy.distributed_epsilon(z, 3, 1e-5, method="analytic") <= eps
    z1 = privacy.distributed_noise_for_epsilon(2.0, 3, 1e-5)
    z4 = privacy.distributed_noise_for_epsilon(2.0, 3, 1e-5, releases=4)
    assert z4 == pytest.approx(2 * z1, rel=2e-3)  # 4 releases: twice the noise for the same epsilon
    # Each task and each release counts: 3 tasks x 2 releases spend like 6 tasks x 1 release.
    assert privacy.distributed_epsilon(z1, 3, 1e-5, 2) == pytest.approx(privacy.distributed_epsilon(z1, 6, 1e-5))
    assert privacy.distributed_epsilon(z1, 3, 1e-5, 2) > privacy.distributed_epsilon(z1, 3, 1e-5)


def test_distributed_summary_counts_every_release_and_an_aborted_one_spends_nothing():
    z = privacy.distributed_noise_for_epsilon(2.0, 3, 1e-5, releases=3)
    out = privacy.distributed_summary(z, 1.0, 1e-5, [1, 2, 3], min_devices=50, transform="fourth-root",
                                      prior_releases=2)
    assert out["releases"] == 3 and out["epsilon"] <= 2.0 and out["epsilon"] == pytest.approx(2.0, rel=2e-3)
    assert out["epsilon_by_tasks"]["1"] < out["epsilon_by_tasks"]["3"] == out["epsilon"]
    assert "3 release(s)" in out["statement"] and "at least 50 devices" in out["statement"]
    aborted = privacy.distributed_summary(z, 1.0, 1e-5, [3], 50, "fourth-root", released=False)
    assert aborted["releases"] == 0 and aborted["epsilon"] == 0.0 and "aborted" in aborted["statement"]


@pytest.mark.parametrize("text, fragment", [
    ('privacy = "distributed"\ndp_noise_multiplier = 5.0\n', "needs secure_aggregation"),
    ('secure_aggregation = true\nprivacy = "distributed"\n', "dp_noise_multiplier > 0"),
    ('secure_aggregation = true\nprivacy = "distributed"\ndp_noise_multiplier = 5.0\nclip_norm = 2.0\n',
     "replaces the local clip"),
    ('secure_aggregation = true\nprivacy = "distributed"\ndp_noise_multiplier = 5.0\ndp_min_devices = 1\n',
     "dp_min_devices"),
    ('privacy = "none"\nclip_norm = 1.0\nnoise_multiplier = 1.0\n', "adds no noise"),
    ('secure_aggregation = true\nprivacy = "distributed"\ndp_noise_multiplier = 5.0\n[finetune]\nrounds = 1\n',
     "finetune.rounds > 0"),
])
def test_settings_refuse_what_distributed_dp_cannot_cover(tmp_path, text, fragment):
    """Fine-tuning uploads weights outside the DP guarantee: refused with the reason, like the rest."""
    path = tmp_path / "s.toml"
    path.write_text("[scoring]\n" + text)
    with pytest.raises(ValueError, match=fragment):
        load_settings(path)
    path.write_text("[scoring]\nsecure_aggregation = true\nprivacy = \"distributed\"\ndp_noise_multiplier = 5.0\n")
    assert load_settings(path).scoring.privacy == "distributed"


def test_simulate_epsilon_with_secure_aggregation_selects_distributed_dp(tmp_path, monkeypatch, capsys):
    import simulations.runner
    from cutfl.cli import main

    path = tmp_path / "secure.toml"
    path.write_text("[scoring]\nsecure_aggregation = true\n")
    seen = {}

    def fake_run(scenario, **kwargs):
        seen["settings"] = load_scenario(scenario, **kwargs["scoring"]).settings
        return {"scenario": "s", "status": "ok", "devices_ok": 1, "devices_rejected": 0, "devices_failed": 0,
                "distinct_plans": 1, "all_within_budget": True, "seconds_total": 0.0, "delta_m": None,
                "scores_to_dense_bytes": None, "privacy": {"mode": "distributed", "epsilon": 2.0}}

    monkeypatch.setattr(simulations.runner, "run_scenario", fake_run)
    assert main(["simulate", str(path), "--epsilon", "2"]) == 0
    s = seen["settings"].scoring
    assert s.privacy == "distributed" and s.noise_multiplier == 0 and s.clip_norm == 0
    assert s.dp_noise_multiplier == pytest.approx(privacy.distributed_noise_for_epsilon(2.0, 3, 1e-5))
    assert privacy.distributed_epsilon(s.dp_noise_multiplier, 3, 1e-5) <= 2.0
    assert json.loads(capsys.readouterr().out)["dp_mode"] == "distributed"
    assert main(["simulate", str(path), "--epsilon", "2", "--clip-norm", "3"]) != 0
    assert "dp_clip" in capsys.readouterr().err
