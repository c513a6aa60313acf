"""Fusion rules and normalisers on hand-made vectors with hand-computed results."""

from __future__ import annotations

import numpy as np
import pytest

from cut.fusion import fuse, normalise, owners, top_fraction

# Two tasks share group "s"; each has its own head group ("ha", "hb").
PER_TASK = {
    "a": {"s": np.array([1.0, 2.0, 3.0, 6.0]), "ha": np.array([2.0, 2.0])},
    "b": {"s": np.array([4.0, 4.0, 0.0, 0.0]), "hb": np.array([1.0, 3.0])},
}
# mean-normalised: a.s = [1/3, 2/3, 1, 2], a.ha = [1, 1]; b.s = [2, 2, 0, 0], b.hb = [0.5, 1.5]


def close(got, want):
    np.testing.assert_allclose(got, np.asarray(want, dtype=np.float64), rtol=1e-6)


def test_owners_are_the_tasks_that_scored_a_group():
    assert owners(PER_TASK) == {"s": ["a", "b"], "ha": ["a"], "hb": ["b"]}


def test_normalisers():
    close(normalise(PER_TASK, "mean")["a"]["s"], [1 / 3, 2 / 3, 1, 2])
    close(normalise(PER_TASK, "sum")["a"]["s"], [1 / 12, 2 / 12, 3 / 12, 6 / 12])
    close(normalise(PER_TASK, "max")["b"]["hb"], [1 / 3, 1])
    close(normalise(PER_TASK, "global")["a"]["ha"], [2 / 16, 2 / 16])  # a's total is 12 + 4
    close(normalise(PER_TASK, "none")["b"]["s"], [4, 4, 0, 0])
    close(normalise({"a": {"z": np.zeros(3)}}, "mean")["a"]["z"], [0, 0, 0])  # no division by zero


def test_default_is_mean_of_per_task_normalised_scores():
    # a's total is 12 + 4 = 16, b's 8 + 4 = 12
    fused = fuse(PER_TASK)
    close(fused["s"], [(1 / 16 + 4 / 12) / 2, (2 / 16 + 4 / 12) / 2, 3 / 32, 6 / 32])
    close(fused["ha"], [2 / 16, 2 / 16])
    close(fused["hb"], [1 / 12, 3 / 12])


def test_mean_rule():
    fused = fuse(PER_TASK, "mean", "mean")
    close(fused["s"], [7 / 6, 4 / 3, 0.5, 1.0])
    close(fused["ha"], [1, 1])  # task-specific groups keep their own task's scores
    close(fused["hb"], [0.5, 1.5])


def test_max_rule():
    fused = fuse(PER_TASK, "max", "mean")
    close(fused["s"], [2, 2, 1, 2])
    close(fused["hb"], [0.5, 1.5])


def test_weighted_rule_uses_priorities():
    fused = fuse(PER_TASK, "weighted", "mean", priorities={"a": 3.0, "b": 1.0})
    close(fused["s"], [0.75, 1.0, 0.75, 1.5])  # (3 * a + 1 * b) / 4
    close(fused["ha"], [1, 1])
    close(fuse(PER_TASK, "weighted")["s"], fuse(PER_TASK, "mean")["s"])  # no priorities: the mean
    with pytest.raises(ValueError, match="priority"):
        fuse(PER_TASK, "weighted", priorities={"a": -1.0})


def test_weighted_without_priorities_is_the_mean_bit_for_bit():
    # cut.planner's default rule is the server's `weighted`; with equal priorities it must equal `mean`
    # exactly, so plans from either rule are the same plan.
    rng = np.random.default_rng(0)
    per_task = {t: {"s": rng.random(7), t: rng.random(3)} for t in ("a", "b", "c")}
    for norm in ("global", "mean", "none"):
        mean, weighted = fuse(per_task, "mean", norm), fuse(per_task, "weighted", norm)
        assert all(np.array_equal(mean[g], weighted[g]) for g in mean)
        equal = fuse(per_task, "weighted", norm, priorities={"a": 1.0, "b": 1.0, "c": 1.0})
        assert all(np.array_equal(mean[g], equal[g]) for g in mean)


def test_union_rule_ranks_units_kept_by_any_task_first():
    # a's units (s then ha): [1/3, 2/3, 1, 2, 1, 1]; top 3 (ties by position) = s3, s2, ha0.
    # b's units (s then hb): [2, 2, 0, 0, 0.5, 1.5]; top 3 = s0, s1, hb1.
    # kept units score 1 + m/(1+m), others m/(1+m), with m the largest normalised task score.
    fused = fuse(PER_TASK, "union", "mean", keep_fraction=0.5)
    close(fused["s"], [1 + 2 / 3, 1 + 2 / 3, 1.5, 1 + 2 / 3])
    close(fused["ha"], [1.5, 0.5])
    close(fused["hb"], [1 / 3, 1 + 1.5 / 2.5])
    with pytest.raises(ValueError, match="keep_fraction"):
        fuse(PER_TASK, "union")


def test_top_fraction_counts_units_globally():
    masks = top_fraction({"x": np.array([3.0, 1.0]), "y": np.array([2.0, 0.0, 5.0])}, 0.4)
    assert masks["x"].tolist() == [True, False] and masks["y"].tolist() == [False, False, True]


def test_fused_scores_are_float32_and_non_negative_for_every_rule():
    for rule in ("max", "mean", "weighted"):
        for norm in ("mean", "sum", "max", "global", "none"):
            fused = fuse(PER_TASK, rule, normalisation=norm)
            assert set(fused) == {"s", "ha", "hb"}
            assert all(v.dtype == np.float32 and np.all(v >= 0) for v in fused.values())


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fuse(PER_TASK, "vote")
    with pytest.raises(ValueError, match="unknown normalisation"):
        fuse(PER_TASK, "mean", normalisation="softmax")
    with pytest.raises(ValueError, match="gives"):
        fuse({"a": {"s": np.ones(3)}, "b": {"s": np.ones(4)}})
    with pytest.raises(ValueError, match="at least one task"):
        fuse({})
