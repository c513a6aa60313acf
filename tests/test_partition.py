"""Client partitions: complete, disjoint, reproducible, and skewed as much as alpha says."""

from __future__ import annotations

import numpy as np
import pytest

from cut.data.partition import partition, partition_dirichlet, partition_iid


def _assert_exact_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def _mean_label_entropy(parts: list[list[int]], labels: np.ndarray) -> float:
    entropies = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=labels.max() + 1)
        q = counts[counts > 0] / counts.sum()
        entropies.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(entropies))


LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced labels


def test_iid_covers_every_index_once_with_balanced_sizes():
    parts = partition_iid(103, 10, seed=3)
    _assert_exact_cover(parts, 103)
    assert {len(p) for p in parts} <= {10, 11}


def test_iid_is_deterministic_by_seed():
    assert partition_iid(50, 4, seed=1) == partition_iid(50, 4, seed=1)
    assert partition_iid(50, 4, seed=1) != partition_iid(50, 4, seed=2)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_covers_every_index_once(alpha):
    parts = partition_dirichlet(LABELS.tolist(), 10, alpha=alpha, seed=0, min_size=5)
    _assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_is_deterministic_by_seed():
    a = partition_dirichlet(LABELS, 8, alpha=0.3, seed=7)
    assert a == partition_dirichlet(LABELS, 8, alpha=0.3, seed=7)
    assert a != partition_dirichlet(LABELS, 8, alpha=0.3, seed=8)


def test_small_alpha_is_more_skewed_than_large_alpha():
    skewed = _mean_label_entropy(partition_dirichlet(LABELS, 10, alpha=0.05, seed=0), LABELS)
    mixed = _mean_label_entropy(partition_dirichlet(LABELS, 10, alpha=100.0, seed=0), LABELS)
    assert skewed < 0.6 * mixed
    assert mixed > 0.9 * np.log(10)  # near-uniform label mix per part


def test_min_size_is_met_even_when_draws_keep_failing():
    labels = np.zeros(40, dtype=int)  # one label: alpha 0.01 puts nearly everything on one part
    parts = partition_dirichlet(labels, 8, alpha=0.01, seed=0, min_size=5)
    _assert_exact_cover(parts, 40)
    assert all(len(p) == 5 for p in parts)


def test_partition_reads_dataset_attributes():
    class Tiny:
        def __len__(self) -> int:
            return len(LABELS)

        def attribute(self, i: int) -> int:
            return int(LABELS[i])

    ds = Tiny()
    assert partition(ds, 5, "dirichlet", alpha=0.5, seed=2) == partition_dirichlet(LABELS, 5, 0.5, seed=2)
    assert partition(ds, 5, "iid", seed=2) == partition_iid(len(LABELS), 5, seed=2)
    with pytest.raises(ValueError, match="scheme"):
        partition(ds, 5, "shards")
    with pytest.raises(ValueError, match="attribute"):
        partition(list(range(10)), 2, "dirichlet")


@pytest.mark.parametrize(
    "call",
    [
        lambda: partition_iid(10, 0),
        lambda: partition_iid(3, 4),
        lambda: partition_dirichlet([0, 1, 2], 4, alpha=1.0),
        lambda: partition_dirichlet([0, 1, 2, 3], 2, alpha=0.0),
        lambda: partition_dirichlet([0, 1, 2, 3], 2, alpha=-1.0),
        lambda: partition_dirichlet([0, 1, 2, 3], 0, alpha=1.0),
        lambda: partition_dirichlet([0, 1, 2, 3], 2, alpha=1.0, min_size=3),
        lambda: partition_dirichlet([0.5, 1.5], 1, alpha=1.0),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
