"""The simulation on an existing Ray cluster (docs/FEDERATION.md, "The simulation on a Ray cluster").

A head and a worker are started with `ray start` on 127.0.0.1, one CPU each, the worker with a custom
resource that names it; a two-device scenario then runs with RAY_ADDRESS pointing at the head. One CPU
per device call means the two device actors cannot share a node: the test checks from Ray's actor table
that they ran on both. Every Ray process of this cluster carries the test's own RAY_TMPDIR in its
environment; they are stopped by process id at the end (not `ray stop`, which would end every Ray on the
machine, other people's runs included). The own RAY_TMPDIR also keeps other runs on this machine from
joining the cluster through Ray's "last cluster started here" file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cut.checkpoint import save_model
from cut.data.scenes import scene_tasks
from cut.models import ModelConfig, build_model

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_processes(tmp: str) -> list[int]:
    """Ids of the processes of the cluster living in `tmp` (its RAY_TMPDIR): those with RAY_TMPDIR=tmp in their
    environment, or with a file open under it (Ray's agents get a trimmed environment but keep their logs open)."""
    wanted = f"RAY_TMPDIR={tmp}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0") or any(
                    os.readlink(fd).startswith(tmp + "/") for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)


def alive(pid: int) -> bool:
    """Running (a zombie whose parent is gone is dead: init reaps it when it gets to it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def ray_start(env: dict, *args: str) -> None:
    ports = ["--ray-client-server-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0"]
    proc = subprocess.run([str(RAY), "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                           "--disable-usage-stats", *ports, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture()
def cluster():
    """(RAY_ADDRESS, env) of a two-node cluster on 127.0.0.1; every process of it is stopped afterwards."""
    if not RAY.is_file():
        pytest.skip("the ray command is not installed")
    tmp = tempfile.mkdtemp(prefix="/tmp/rc")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": tmp, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    try:
        ray_start(env, "--head", "--port", str(port), "--include-dashboard=false")
        ray_start(env, "--address", f"127.0.0.1:{port}", "--resources", '{"cutfl_worker": 1}')
        yield f"127.0.0.1:{port}", env
    finally:
        stop(cluster_processes(tmp))
        left = cluster_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from simulations.runner import run_scenario

    summary = run_scenario(sys.argv[1], out_dir=sys.argv[2])
    ray.init(address=sys.argv[3], logging_level="ERROR")
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("cutfl_worker")}
    nodes = [a["Address"]["NodeID"] for a in ray._private.state.actors().values()
             if a["ActorClassName"].endswith("ClientAppActor")]
    print(json.dumps({"status": summary["status"], "devices_ok": summary["devices_ok"], "actor_nodes": nodes,
                      "worker_nodes": sorted(workers), "cluster_cpus": ray.cluster_resources().get("CPU")}))
""")


def test_simulation_runs_its_devices_on_both_nodes_of_an_existing_cluster(cluster, tmp_path):
    address, env = cluster
    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16))
    save_model(tmp_path / "base", model, {"dataset": "scenes", "dataset_kwargs": {"size": 32, "seed": 0}})
    scenario = tmp_path / "two.toml"
    scenario.write_text(f'[scenario]\nname = "two"\ndevices = 2\n[model]\nbase = "{tmp_path / "base"}"\n'
                        "[data]\nsamples_per_device = 16\nmin_samples = 6\n[scoring]\nnum_batches = 1\nbatch_size = 8\n"
                        "[planning]\nround_to = 4\nmin_channels = 4\n[recovery]\nsamples = 16\nsteps = 2\n"
                        "batch_size = 8\n[evaluation]\nbatch_size = 8\n[timeouts]\nnodes = 60\n")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(scenario), str(tmp_path / "out"), address],
                          env={**env, "RAY_ADDRESS": address, "CUTFL_NO_PROGRESS": "1"},
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["devices_ok"] == 2
    assert result["cluster_cpus"] == 2.0  # the driver joined the cluster (a fresh local Ray would have its own)
    assert len(set(result["actor_nodes"])) == 2, result  # one device actor per node: both nodes did work
    assert set(result["worker_nodes"]) <= set(result["actor_nodes"]) and len(result["worker_nodes"]) == 1
