"""Privacy of the scores: the accountant (server.privacy), the sensitivity it relies on, the report's
privacy fields and the `cutfl simulate` privacy flags. In process, no Flower run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from client.scoring import normalised, privatise
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
        clipped = privatise({"t": {"g": raw.astype(np.float32)}}, settings, seed=0)["t"]["g"]
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
    scores = normalised({"seg": {"a": np.array([0.0, 2.0, 1.0]), "b": np.array([3.0])}})
    assert all((v >= 0).all() for v in scores["seg"].values())
    noisy = privatise(scores, PrivacySettings(clip_norm=1.0, noise_multiplier=5.0, seed=3), seed=0)
    assert all((v >= 0).all() for v in noisy["seg"].values())  # clamped after the noise: post-processing


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
            "bytes_up_scores": 100, "report_source": "live", "scores_to_dense_bytes": 0.001, "bytes_up": 200,
            "bytes_down": 300, "device_id": "d" + "".join(tasks), "device_class": "c", "reason": "",
            "dp_epsilon": None}


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
