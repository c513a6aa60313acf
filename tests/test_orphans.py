"""No Flower process outlives what started it: a SuperNode killed with SIGKILL leaves no SuperExec or
ClientApp behind, nor does a helper (deploy.local) that is itself killed, and `cutfl simulate` stopped with
SIGTERM leaves no Ray process. Every process is looked up by pid under the ones the test started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploy.local import LocalFederation, _exists, _started_for, descendants, free_port

ROOT = Path(__file__).resolve().parent.parent


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _supernode_and_superexec(top: int, timeout: float = 120.0) -> tuple[int, int]:
    """The flower-supernode process at or below `top`, and the SuperExec it started (`--parent-pid`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in [top, *descendants(top)]:
            if any(a.endswith("flower-supernode") for a in _cmdline(pid)[:2]):
                execs = _started_for([pid])
                if execs:
                    return pid, execs[0]
        time.sleep(0.2)
    raise AssertionError(f"no SuperNode with a SuperExec below {top} after {timeout:.0f} s")


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_exists(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _exists(p)]


@pytest.mark.slow
def test_a_supernode_killed_with_sigkill_leaves_no_superexec(tmp_path):
    with LocalFederation(tmp_path) as fed:  # insecure, no SuperLink: the SuperNode starts its SuperExec anyway
        fed.port = free_port()
        process = fed.start_supernode("n0", {"tasks": "seg"})
        supernode, superexec = _supernode_and_superexec(process.popen.pid)
        below = [superexec, *descendants(supernode)]
        os.kill(supernode, signal.SIGKILL)
        left = _gone_within(below, 15.0)  # without stop(): nothing must wait for the helper to clean up
        assert not left, [(p, _cmdline(p)) for p in left]
    assert not fed.leftovers


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_helper_that_dies_takes_its_flower_processes_with_it(tmp_path, sig):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from deploy.local import LocalFederation, free_port
        fed = LocalFederation(Path({str(tmp_path)!r}))
        fed.port = free_port()
        fed.start_supernode("n0", {{"tasks": "seg"}})
        print("started", flush=True)
        time.sleep(600)
    """)
    helper = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    below: list[int] = []
    try:
        assert helper.stdout.readline().strip() == "started"
        supernode, superexec = _supernode_and_superexec(helper.pid)
        below = [p for p in descendants(helper.pid) if p != helper.pid]
        assert supernode in below and superexec in below + _started_for([supernode])
        helper.send_signal(sig)
        helper.wait(timeout=30)
        left = _gone_within([*below, superexec], 20.0)
        assert not left, [(p, _cmdline(p)) for p in left]
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        for pid in [*descendants(helper.pid), *below]:  # normally none; never leave one behind
            if _exists(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cutfl_simulate_stopped_by_a_signal_leaves_no_ray_process(tmp_path, sig):
    from tests.test_federation import scenario_file, tiny_model_dir

    base = tiny_model_dir(tmp_path, samples=32, epochs=1)
    scenario = scenario_file(tmp_path, base, rounds=0, devices={0: {"tasks": ["seg"]}, 1: {"tasks": ["depth"]}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUTFL_NO_PROGRESS": "1"}
    cli = subprocess.Popen([sys.executable, "-m", "cutfl", "simulate", str(scenario), "--out", str(tmp_path / "out"),
                            "--quiet"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, start_new_session=True)
    below: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and cli.poll() is None:
            below = descendants(cli.pid)
            if any("raylet" in " ".join(_cmdline(p)) for p in below):
                break
            time.sleep(0.2)
        assert cli.poll() is None and below, "Ray did not start"
        time.sleep(3)  # workers up
        below = descendants(cli.pid)
        cli.send_signal(sig)
        cli.wait(timeout=60)
        left = _gone_within(below, 30.0)
        assert not left, [(p, _cmdline(p)[:3]) for p in left]
        assert cli.returncode != 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for pid in below:
            if _exists(pid):
                os.kill(pid, signal.SIGKILL)
