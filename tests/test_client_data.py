"""A device's private data (client.data.local_data): its part of the pool, split into train and held-out eval.

Only indices are compared (samples are rendered lazily and never touched here), so these tests are fast.
"""

from __future__ import annotations

import pytest

import client.data as data_module
from client.data import local_data
from client.device import Device
from cut.messages import Budget
from protocol.phases import DataSpec


def spec(**kw) -> DataSpec:
    base = dict(dataset="scenes", dataset_kwargs={"size": 16}, samples_per_device=20, partition="iid", seed=0)
    return DataSpec(**{**base, **kw})


def device(pid: int, parts: int, data: DataSpec) -> Device:
    return Device(f"device-{pid:04d}", pid, parts, ("seg",), Budget("params", 0.5), "phone", data)


def fleet_indices(data: DataSpec, parts: int) -> list[tuple[list[int], list[int]]]:
    """(train indices, eval indices) of every device, in pool coordinates."""
    out = []
    for pid in range(parts):
        local = local_data(device(pid, parts, data))
        assert local.train.dataset is local.eval.dataset  # both from the one pool
        out.append((list(local.train.indices), list(local.eval.indices)))
    return out


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_devices_hold_disjoint_parts_of_the_pool(partition):
    parts = 6
    data = spec(partition=partition, alpha=0.3)
    fleet = fleet_indices(data, parts)
    pool = len(local_data(device(0, parts, data)).train.dataset)
    assert pool == data.samples_per_device * parts
    seen: list[int] = []
    for train, held_out in fleet:
        assert train and held_out
        assert not set(train) & set(held_out)  # a device never evaluates on what it trains on
        assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
        seen += train + held_out
    assert len(seen) == len(set(seen))  # no sample is on two devices
    assert sorted(seen) == list(range(pool))  # and every sample of the pool is on one
    if partition == "iid":
        assert all(len(t) + len(e) == data.samples_per_device for t, e in fleet)


def test_partitions_are_deterministic_and_follow_the_data_seed():
    data = spec(partition="dirichlet", alpha=0.5)
    first = fleet_indices(data, 5)
    data_module._pool.cache_clear()  # rebuilt from scratch, as in another process
    data_module._parts.cache_clear()
    assert fleet_indices(data, 5) == first
    assert fleet_indices(spec(partition="dirichlet", alpha=0.5, seed=1), 5) != first


@pytest.mark.parametrize(("fraction", "eval_size"), [(0.25, 5), (0.5, 10), (0.1, 2), (0.9, 18),
                                                     (0.01, 1), (0.99, 19)])
def test_eval_split_follows_eval_fraction(fraction, eval_size):
    """round(eval_fraction x samples) are held out, but at least one, and at least one is left to train on."""
    for pid in range(3):
        local = local_data(device(pid, 3, spec(eval_fraction=fraction)))
        assert local.num_train + len(local.eval) == 20
        assert len(local.eval) == eval_size and local.num_train == 20 - eval_size


def test_eval_split_is_a_shuffled_draw_not_the_first_samples():
    local = local_data(device(0, 2, spec(samples_per_device=40)))
    part = sorted(list(local.train.indices) + list(local.eval.indices))
    assert list(local.eval.indices) != part[:len(local.eval)]
    assert list(local.train.indices) == sorted(local.train.indices)  # sorted: a stable order for loaders


def test_min_samples_is_respected_under_a_strong_skew():
    """Dirichlet with a tiny alpha leaves some devices with very few samples unless min_samples holds."""
    skewed = dict(partition="dirichlet", alpha=0.05, samples_per_device=12, seed=0)
    loose = [len(t) + len(e) for t, e in fleet_indices(spec(min_samples=1, **skewed), 6)]
    assert min(loose) < 6  # the constraint below is not met by chance
    for seed in range(3):
        sizes = [len(t) + len(e) for t, e in fleet_indices(spec(min_samples=6, **{**skewed, "seed": seed}), 6)]
        assert min(sizes) >= 6 and sum(sizes) == 72, sizes
    # at least 2 whatever min_samples says: one to train on, one to evaluate on
    assert all(len(t) >= 1 and len(e) >= 1 for t, e in fleet_indices(spec(min_samples=1, **skewed), 6))


def test_a_partition_id_outside_the_fleet_is_refused():
    for pid in (-1, 3):
        with pytest.raises(ValueError, match=rf"partition id {pid} outside \[0, 3\)"):
            local_data(device(pid, 3, spec()))


def test_impossible_minimums_are_refused():
    with pytest.raises(ValueError, match="cannot give 4 parts of at least 30"):
        local_data(device(0, 4, spec(partition="dirichlet", samples_per_device=20, min_samples=30)))
