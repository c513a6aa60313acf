"""A device's private data: its part of a pool of samples, split into local train and held-out eval.

The pool is `dataset` with `samples_per_device * num_partitions` samples, partitioned IID or with a
Dirichlet skew over the dataset's attribute (room type for `scenes`), so devices differ in what they
see. Pool and partition are cached per process: the simulation engine runs many devices in one Ray actor,
and rebuilding them per message would dominate the run time. Samples are rendered lazily on access.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from torch.utils.data import Dataset, Subset

from client.device import Device
from cut.data import get_dataset
from cut.data.partition import partition
from protocol.phases import DataSpec


@dataclass(frozen=True)
class LocalData:
    train: Subset  # scoring and fine-tuning
    eval: Subset  # the device's own evaluation of dense vs compact

    @property
    def num_train(self) -> int:
        return len(self.train)


def _spec_key(spec: DataSpec) -> str:
    return json.dumps(
        {"dataset": spec.dataset, "kwargs": spec.dataset_kwargs, "per": spec.samples_per_device}, sort_keys=True
    )


@lru_cache(maxsize=4)
def _pool(key: str, num_partitions: int) -> Dataset:
    d = json.loads(key)
    kwargs = dict(d["kwargs"])
    kwargs["num_samples"] = int(d["per"]) * num_partitions
    return get_dataset(d["dataset"], "train", **kwargs)


@lru_cache(maxsize=4)
def _parts(key: str, num_partitions: int, scheme: str, alpha: float, seed: int, min_size: int) -> tuple:
    parts = partition(_pool(key, num_partitions), num_partitions, scheme, alpha, seed, min_size)
    return tuple(tuple(p) for p in parts)


def local_data(device: Device) -> LocalData:
    """The device's train / eval subsets (deterministic in the data spec and partition id)."""
    spec = device.data
    if not 0 <= device.partition_id < device.num_partitions:
        raise ValueError(f"device: partition id {device.partition_id} outside [0, {device.num_partitions})")
    key = _spec_key(spec)
    part = list(_parts(key, device.num_partitions, spec.partition, spec.alpha, spec.seed, max(2, spec.min_samples))
                [device.partition_id])
    order = np.random.default_rng([spec.seed, 104729, device.partition_id]).permutation(len(part))
    n_eval = min(len(part) - 1, max(1, round(spec.eval_fraction * len(part))))
    eval_idx = sorted(part[i] for i in order[:n_eval])
    train_idx = sorted(part[i] for i in order[n_eval:])
    pool = _pool(key, device.num_partitions)
    return LocalData(train=Subset(pool, train_idx), eval=Subset(pool, eval_idx))


__all__ = ["LocalData", "local_data"]
