"""`flwr run .` the Flower way, end to end on Flower's local simulation SuperLink (a slow test, run in CI).

`cutfl run local` is `flwr run .` from this checkout with the simulation sized to the scenario, no runtime
dependency installation, live per-device progress and the run's final status; a bare `flwr run` whose
simulation has fewer SuperNodes than the scenario's devices ends finished:failed within seconds (not after the
120 s node wait). Tiny model, four devices; Flower's home, the SuperLink's ports and every path are the
test's own, and the detached SuperLink that `flwr run` starts is stopped by its process id at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cut.checkpoint import save_model
from cut.data.scenes import scene_tasks
from cut.models import ModelConfig, build_model
from deploy.flwr_run import flwr_env, start_run, wait_for_run

pytestmark = pytest.mark.slow
CHECKOUT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def superlink_pids(port: int) -> list[int]:
    """Process ids of the local SuperLink (and its SuperExec) serving `port`, from /proc (no broad kill)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if ("flower-superlink" in text and f"--port {port}" in text) or (
                "flower-superexec" in text and f"127.0.0.1:{port}" in text):
            pids.append(int(entry.name))
    return pids


def stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def local_link(tmp_path):
    """FLWR_HOME, ports and environment of a private local simulation SuperLink; stopped afterwards."""
    port, control = free_port(), free_port()
    env = flwr_env(tmp_path / "flwr", {**os.environ, "OMP_NUM_THREADS": "1", "CUTFL_NO_PROGRESS": "0",
                                       "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
                                       "FLWR_LOCAL_CONTROL_API_PORT": str(control)})
    yield env
    stop(superlink_pids(port))
    assert not superlink_pids(port), "the local SuperLink is still running"


def tiny_scenario(root: Path, devices: int) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16))
    save_model(root / "base", model, {"dataset": "scenes", "dataset_kwargs": {"size": 32, "seed": 0}})
    path = root / "tiny.toml"
    path.write_text(f'[scenario]\nname = "tiny"\ndevices = {devices}\n[model]\nbase = "{root / "base"}"\n'
                    "[data]\nsamples_per_device = 16\nmin_samples = 6\n[scoring]\nnum_batches = 1\nbatch_size = 8\n"
                    "[planning]\nround_to = 4\nmin_channels = 4\n[recovery]\nsamples = 16\nsteps = 2\nbatch_size = 8\n"
                    "[evaluation]\nbatch_size = 8\n[timeouts]\nnodes = 120\n")
    return path


def test_flwr_run_simulates_the_scenario_and_reports_failure_as_failure(tmp_path, local_link):
    env = local_link
    scenario = tiny_scenario(tmp_path, devices=4)
    proc = subprocess.run([sys.executable, "-m", "cutfl", "run", "local", "--scenario", str(scenario), "--out",
                           "out", "--timeout", "240", "--poll", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "finished:completed" and result["devices_ok"] == result["devices_expected"] == 4
    assert isinstance(result["delta_m_mean"], float) and result["out-dir"] == str(tmp_path / "out")
    assert "4 simulated SuperNodes" in proc.stderr
    assert "profile: 2/4" in proc.stderr and "evaluate: 4/4" in proc.stderr  # live, per device
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["devices_ok"] == 4
    assert not (tmp_path / "flwr" / "runtime-envs").exists()  # no environment installed for the run

    # A bare `flwr run` gets Flower's default of 2 simulated SuperNodes: refused in seconds, and failed.
    start = time.monotonic()
    run_id = start_run(CHECKOUT, "local", {"scenario": str(scenario), "out-dir": str(tmp_path / "out2")}, env=env)
    failed = wait_for_run("local", run_id, timeout=180, poll=1, env=env)
    assert failed.status == "finished:failed", failed
    assert "num-supernodes=4" in failed.details and time.monotonic() - start < 120
