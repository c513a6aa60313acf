"""Test-wide settings: one torch thread per process.

With two cores and Flower/Ray or subprocesses running beside the test process, OpenMP threads wait on
each other: the engine tests measured 13.6 s with one thread and 303 s with two on a loaded machine.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CUTFL_NO_PROGRESS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def skip_unless_installed(present: bool, what: str) -> None:
    """Skip a test whose resource is missing on a developer's machine; in CI (CI=true) fail instead, so a
    green run means it was tested (.ci/run installs every resource)."""
    if present:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not installed (scripts/setup.sh installs it)")
    pytest.skip(f"{what} not installed")
