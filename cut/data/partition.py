"""Split a dataset's indices between federated clients: IID or Dirichlet label skew.

Every function returns one sorted list of indices per part; every index appears in exactly one part
and the result depends only on the inputs and `seed`, so a scenario can be replayed exactly.

The Dirichlet scheme is the label-skew partition commonly attributed to Hsu et al. (2019), in the form
most FL code uses (Yurochkin et al. 2019; NIID-Bench, Li et al. 2022): for each attribute value, the
samples carrying it are shuffled and split between the parts in proportions drawn from Dir(alpha).
Small alpha gives parts dominated by few attribute values (and unequal sizes); large alpha tends to IID.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_MAX_DRAWS = 50  # redraws before a partition that leaves a part too small is repaired instead


def partition_iid(n: int, num_parts: int, seed: int = 0) -> list[list[int]]:
    """Shuffle 0..n-1 and cut it into `num_parts` parts whose sizes differ by at most one."""
    _check_sizes(n, num_parts, min_size=1)
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in chunk) for chunk in np.array_split(order, num_parts)]


def partition_dirichlet(
    attributes: Sequence[int],
    num_parts: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Label-skewed parts: each attribute value is spread over the parts by a Dir(alpha) draw.

    Draws are repeated (up to a bound) until every part holds at least `min_size` samples; if that
    bound is reached, samples are moved from the largest parts to the small ones, which keeps the
    result deterministic and always terminating even for tiny alpha and many parts.
    """
    labels = np.asarray(list(attributes))
    if labels.ndim != 1:
        raise ValueError("attributes must be a flat sequence of ints, one per sample")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"attributes must be ints, got dtype {labels.dtype}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_sizes(len(labels), num_parts, min_size)
    rng = np.random.default_rng(seed)
    by_value = [np.flatnonzero(labels == v) for v in np.unique(labels)]
    parts = _draw_dirichlet(by_value, num_parts, alpha, rng)
    for _ in range(_MAX_DRAWS - 1):
        if min(len(p) for p in parts) >= min_size:
            break
        parts = _draw_dirichlet(by_value, num_parts, alpha, rng)
    _repair_small_parts(parts, min_size, rng)
    return [sorted(int(i) for i in p) for p in parts]


def partition(
    dataset: Any,
    num_parts: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Partition a dataset following the contract in `cut.data` (`len` and, for Dirichlet, `attribute`)."""
    n = len(dataset)
    if scheme == "iid":
        return partition_iid(n, num_parts, seed)
    if scheme == "dirichlet":
        if not callable(getattr(dataset, "attribute", None)):
            raise ValueError("dirichlet partitioning needs a dataset with an attribute(i) method")
        attributes = [int(dataset.attribute(i)) for i in range(n)]
        return partition_dirichlet(attributes, num_parts, alpha, seed, min_size)
    raise ValueError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")


def _check_sizes(n: int, num_parts: int, min_size: int) -> None:
    if int(num_parts) != num_parts or num_parts < 1:
        raise ValueError(f"num_parts must be an int >= 1, got {num_parts}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_parts > n:
        raise ValueError(f"cannot split {n} samples into {num_parts} non-empty parts")
    if num_parts * min_size > n:
        raise ValueError(f"{n} samples cannot give {num_parts} parts of at least {min_size} each")


def _draw_dirichlet(
    by_value: list[np.ndarray], num_parts: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for idx in by_value:
        idx = rng.permutation(idx)
        share = rng.dirichlet(np.full(num_parts, float(alpha)))
        if not np.all(np.isfinite(share)) or share.sum() <= 0:
            # Very small alpha can underflow every component; all mass on one part is the limit.
            share = np.eye(num_parts)[rng.integers(num_parts)]
        cuts = np.floor(np.cumsum(share)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(int(i) for i in chunk)
    return parts


def _repair_small_parts(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move randomly chosen samples from the currently largest part to each part below `min_size`."""
    for part in parts:
        while len(part) < min_size:
            donor = max(parts, key=len)
            part.append(donor.pop(int(rng.integers(len(donor)))))
