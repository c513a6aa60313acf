"""Robust aggregation: trimmed mean, server-side clipping, a small synthetic attack, and fine-tune updates
bounded against their plan's weights (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest

from server.aggregate import aggregate, bound_updates, clip_to_median, trimmed_mean


def test_trimmed_mean_drops_the_ends_per_coordinate():
    vectors = [np.array([1.0, 10.0]), np.array([2.0, 20.0]), np.array([3.0, 30.0]), np.array([100.0, -50.0])]
    # n = 4, trim 0.25: one value dropped at each end of every coordinate
    np.testing.assert_allclose(trimmed_mean(vectors, 0.25), [2.5, 15.0])
    np.testing.assert_allclose(trimmed_mean(vectors, 0.0), np.mean(vectors, axis=0))
    # too few devices to drop any: the plain mean; never drops everything
    np.testing.assert_allclose(trimmed_mean(vectors[:3], 0.2), np.mean(vectors[:3], axis=0))
    np.testing.assert_allclose(trimmed_mean(vectors[:2], 0.49), np.mean(vectors[:2], axis=0))
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(vectors, 0.5)


def test_trimmed_mean_rule_in_aggregate_ignores_an_outlier():
    honest = {"seg": {"g": np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)}}
    poisoned = {"seg": {"g": np.array([100.0, 0.0, 0.0, 0.0], dtype=np.float32)}}
    reports = [(honest, {"seg": 1.0})] * 9 + [(poisoned, {"seg": 1.0})]
    out = aggregate(reports, "trimmed-mean", trim_fraction=0.1)["seg"]["g"]
    np.testing.assert_allclose(out, [0.25] * 4, rtol=1e-6)  # normalised per task: honest is 0.25 each
    moved = aggregate(reports, "weighted-mean")["seg"]["g"]
    assert moved[0] > 0.3  # the plain mean is pulled by the single crafted report
    with pytest.raises(ValueError, match="trim_fraction"):
        aggregate(reports, "trimmed-mean", trim_fraction=0.6)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(reports, "mode")


def test_server_clip_bounds_each_vector_to_a_multiple_of_the_median_norm():
    vectors = [np.array([3.0, 4.0]), np.array([0.6, 0.8]), np.array([0.0, 2.0]), np.array([30.0, 40.0])]
    clipped = clip_to_median(vectors, 1.0)  # norms 5, 1, 2, 50: median 3.5
    norms = [float(np.linalg.norm(v)) for v in clipped]
    np.testing.assert_allclose(norms, [3.5, 1.0, 2.0, 3.5])
    np.testing.assert_allclose(clipped[3] / np.linalg.norm(clipped[3]), [0.6, 0.8])  # direction kept
    assert clip_to_median(vectors, 0.0) is vectors
    with pytest.raises(ValueError, match="server_clip"):
        aggregate([({"seg": {"g": np.ones(2)}}, {"seg": 1.0})], server_clip=-1.0)


def test_server_clip_applies_per_task_and_group():
    a = {"seg": {"g1": np.array([1.0, 1.0]), "g2": np.array([1.0, 1.0])}}
    spike = {"seg": {"g1": np.array([0.0, 0.0]), "g2": np.array([0.0, 4.0])}}
    reports = [(a, {"seg": 1.0})] * 4 + [(spike, {"seg": 1.0})]
    plain = aggregate(reports, "weighted-mean")["seg"]["g2"]
    clipped = aggregate(reports, "weighted-mean", server_clip=1.0)["seg"]["g2"]
    assert clipped[1] < plain[1]  # the spike's g2 vector (norm 1 after normalisation) is clipped to 0.25*sqrt(2)
    np.testing.assert_allclose(clipped[1], (4 * 0.25 + 0.25 * np.sqrt(2)) / 5, rtol=1e-5)


def _honest_fleet(rng: np.random.Generator, devices: int, channels: int) -> tuple[np.ndarray, list[dict]]:
    """Heavy-tailed channel importance shared by the fleet, each device a noisy view of it."""
    truth = rng.gamma(0.4, 1.0, size=channels)
    reports = []
    for _ in range(devices):
        view = truth * rng.lognormal(0.0, 0.3, size=channels)
        reports.append({"seg": {"g0": view[: channels // 2], "g1": view[channels // 2:]}})
    return truth, reports


def _kept(agg: dict, keep: int) -> set[int]:
    flat = np.concatenate([agg["seg"]["g0"], agg["seg"]["g1"]])
    return set(np.argsort(-flat, kind="stable")[:keep].tolist())


def test_synthetic_boost_attack_moves_the_mean_but_not_trimmed_mean_with_clip():
    rng = np.random.default_rng(0)
    devices, channels, keep = 50, 128, 64
    truth, honest = _honest_fleet(rng, devices, channels)
    reference = {rule: _kept(aggregate([(r, {"seg": 1.0}) for r in honest], rule, **kw), keep)
                 for rule, kw in (("weighted-mean", {}), ("trimmed-mean", {"server_clip": 1.0}))}
    # 10% of the devices put all their (normalisation-aware) mass on 24 channels the fleet ranks lowest
    targets = np.argsort(truth)[:24]
    crafted = np.zeros(channels)
    crafted[targets] = 1.0
    crafted *= honest[0]["seg"]["g0"].sum() + honest[0]["seg"]["g1"].sum()
    attack = {"seg": {"g0": crafted[: channels // 2], "g1": crafted[channels // 2:]}}
    reports = [(attack if i < devices // 10 else r, {"seg": 1.0}) for i, r in enumerate(honest)]

    def change(rule: str, **kw) -> float:
        got = _kept(aggregate(reports, rule, **kw), keep)
        return len(reference[rule] - got) / keep

    assert change("weighted-mean") > 0.15
    assert change("trimmed-mean", trim_fraction=0.1, server_clip=1.0) < 0.05


# ------------------------------------------------------------------------ fine-tune updates of one plan


def _plan_group(scales: list[float], seed: int = 0) -> tuple[dict, list[dict]]:
    """A plan's weights and one update per device: the weights plus a delta of ~1% of their norm x scale."""
    rng = np.random.default_rng(seed)
    reference = {"conv.weight": rng.normal(size=(8, 4)).astype(np.float32),
                 "bn.running_var": np.ones(8, np.float32), "bn.num_batches_tracked": np.array(10, np.int64)}
    updates = []
    for scale in scales:
        step = rng.normal(size=(8, 4)) * 0.01 * np.linalg.norm(reference["conv.weight"]) / np.sqrt(32)
        updates.append({"conv.weight": (reference["conv.weight"] + scale * step).astype(np.float32),
                        "bn.running_var": (1.0 + rng.uniform(0.0, 0.1, 8)).astype(np.float32),
                        "bn.num_batches_tracked": np.array(15, np.int64)})
    return reference, updates


def _norm(update: dict, reference: dict, name: str = "conv.weight") -> float:
    return float(np.linalg.norm(update[name].astype(np.float64) - reference[name]))


def test_bound_updates_leaves_an_honest_group_as_it_is():
    reference, updates = _plan_group([1.0, 1.2, 0.9, 1.1])
    bounded, refused = bound_updates(updates, reference, 2.0)
    assert refused == {} and sorted(bounded) == [0, 1, 2, 3]
    for i, u in enumerate(updates):
        for name, value in u.items():
            np.testing.assert_array_equal(bounded[i][name], value, err_msg=name)


def test_bound_updates_excludes_every_outlier_of_a_group_of_four_naming_the_median():
    reference, updates = _plan_group([1.0, 1.1, 10.0, 30.0])  # two of four scaled: the lower median is honest
    bounded, refused = bound_updates(updates, reference, 2.0)
    assert sorted(refused) == [2, 3] and sorted(bounded) == [0, 1]
    assert all("median delta norm" in why and "clip_multiple 2" in why for why in refused.values())


def test_bound_updates_in_a_group_of_three_excludes_what_is_beyond_the_multiple_only():
    reference, updates = _plan_group([1.0, 1.0, 1.0])
    median = sorted(_norm(u, reference) for u in updates)[1]
    for factor, excluded in ((1.9, False), (2.1, True)):
        scaled = dict(updates[2])
        scaled["conv.weight"] = (reference["conv.weight"] + (updates[2]["conv.weight"] - reference["conv.weight"])
                                 * factor * median / _norm(updates[2], reference)).astype(np.float32)
        _, refused = bound_updates([updates[0], updates[1], scaled], reference, 2.0)
        assert (2 in refused) is excluded, factor


def test_bound_updates_clips_batchnorm_statistics_and_takes_the_median_count():
    reference, updates = _plan_group([1.0, 1.0, 1.0])
    updates[2]["bn.running_var"] = np.full(8, 1e6, np.float32)  # passes check_update: statistics may move
    updates[2]["bn.num_batches_tracked"] = np.array(2**62, np.int64)
    bounded, refused = bound_updates(updates, reference, 2.0)
    assert refused == {}  # statistics alone never exclude: devices with other data move them more
    honest = sorted(_norm(u, reference, "bn.running_var") for u in updates[:2])
    clipped = _norm(bounded[2], reference, "bn.running_var")
    assert clipped == pytest.approx(2.0 * honest[1], rel=1e-5)  # the median of the three is the larger honest one
    assert (bounded[2]["bn.running_var"] > 0).all()  # a convex blend of two variances stays a variance
    assert all(b["bn.num_batches_tracked"] == 15 and b["bn.num_batches_tracked"].dtype == np.int64
               for b in bounded.values())
    low = [dict(u, **{"bn.num_batches_tracked": np.array(3, np.int64)}) for u in updates]
    assert bound_updates(low, reference, 2.0)[0][0]["bn.num_batches_tracked"] == 10  # never below the start


def test_bound_updates_with_no_movement_in_the_group_excludes_any_movement():
    reference, updates = _plan_group([0.0, 0.0, 1.0])  # e.g. steps = 0: an honest update is the plan itself
    bounded, refused = bound_updates(updates, reference, 2.0)
    assert sorted(refused) == [2] and "median delta norm 0" in refused[2]
    with pytest.raises(ValueError, match="clip_multiple"):
        bound_updates(updates, reference, 0.5)


def test_clip_multiple_is_a_finetune_setting_with_bounds(tmp_path):
    from server.settings import FinetuneSettings, load_settings

    assert FinetuneSettings().clip_multiple == 2.0
    path = tmp_path / "s.toml"
    path.write_text("[finetune]\nclip_multiple = 3.5\n")
    assert load_settings(path).finetune.clip_multiple == 3.5
    for bad in ("0.5", "1000.0", '"big"'):
        path.write_text(f"[finetune]\nclip_multiple = {bad}\n")
        with pytest.raises(ValueError, match=r"finetune.*clip_multiple"):
            load_settings(path)
