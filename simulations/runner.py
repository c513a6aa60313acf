"""Run a scenario on Flower's simulation engine, in this process, and return its report summary.

The ServerApp runs in a thread of this process with its settings bound directly (`run_simulation` leaves
the run config empty); each simulated device is a ClientApp call inside a Ray actor (one per CPU core),
built with the scenario's fleet bound in (simulations.app): devices know who they are from it, and the
server never sends it.

Stopping it: Flower's run_simulation does not end the ServerApp thread (a non-daemon thread) on SIGINT, and
Ray's driver turns SIGTERM into SystemExit, so `cutfl simulate` stopped with either signal would hang while
Ray's processes (raylet, GCS, workers) run on. While the simulation runs (from the main thread),
`stop_on_signals` makes SIGTERM, SIGINT and SIGHUP end every process below this one (SIGTERM, then SIGKILL)
and exit at once with 128 + the signal (for SIGTERM through the SystemExit that Ray's handler raises, since
`ray.init` replaces the handler). The run directory stays consistent (every file is written
atomically): `--resume` continues from it. A SIGKILL cannot be caught; Ray's own fate sharing
(PR_SET_PDEATHSIG on the processes `ray.init` starts) ends raylet and GCS then, and the workers follow them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from cut.checkpoint import load_model
from server.settings import Settings
from simulations.scenario import load_scenario, resolve


def ensure_base_model(settings: Settings, may_pretrain: bool = True) -> Path:
    """The scenario's base model directory, pre-trained (cut.train.pretrain_model) when it is missing (only for
    the scenario's own path: a mistyped --base-model should not start a pre-training)."""
    directory = settings.base_model_dir
    if (directory / "model.json").is_file():
        return directory
    if not may_pretrain or (directory.exists() and any(directory.iterdir())):
        raise ValueError(f"{directory} is not a cut-fl model directory (run `cutfl pretrain --out {directory}`)")
    dataset = settings.data.dataset or "scenes"
    print(f"cutfl simulate: no base model in {directory}; pre-training one on {dataset} (a few minutes, once)",
          file=sys.stderr)
    from cut.train import pretrain_model

    pretrain_model(dataset, directory, progress=os.environ.get("CUTFL_NO_PROGRESS") != "1")
    return directory


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, by parent id (/proc; empty elsewhere)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # pid (comm) state ppid ...; comm may hold spaces
        if entry.isdigit() and len(fields) > 1:
            tree.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] != "Z"


def end_descendants(grace: float = 5.0) -> None:
    """SIGTERM every process below this one, wait up to `grace` seconds, SIGKILL what is left.

    Every process seen below us is remembered: one whose parent (raylet) died first is re-parented away from
    this tree (Ray's DashboardAgent, RuntimeEnvAgent) and would be missed by a second look at the tree."""
    seen: set[int] = set()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        seen.update(_descendants(os.getpid()))
        for pid in sorted(seen):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(pid) for pid in seen):
            seen.update(_descendants(os.getpid()))
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)  # our own children (raylet, GCS) must not linger as zombies
            time.sleep(0.1)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGTERM, SIGINT or SIGHUP end this process's descendants (Ray) and exit 128 + signal.
    Outside the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig: int, _frame) -> None:
        print(f"cutfl simulate: stopped by {signal.Signals(sig).name}; ending Ray's processes", file=sys.stderr)
        try:
            end_descendants()
        finally:
            os._exit(128 + sig)  # the ServerApp thread cannot be joined: leave now, the run directory is consistent

    signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    except SystemExit as e:  # ray.init replaces the SIGTERM handler with sys.exit(signum)
        if e.code != signal.SIGTERM:
            raise
        stop(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def backend_config(num_cpus: int | None = None) -> dict[str, Any]:
    """One CPU per device call, so as many devices run at once as there are cores."""
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if num_cpus:
        init_args["num_cpus"] = num_cpus
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def run_scenario(
    path_or_name: str | Path = "default",
    devices: int | None = None,
    out_dir: str | Path | None = None,
    base_model_dir: str | Path | None = None,
    num_cpus: int | None = None,
    resume: bool = False,
    scoring: dict[str, Any] | None = None,
    oracle: bool = False,
) -> dict[str, Any]:
    """Run one scenario end to end; returns the report summary (also in OUT/report.json).

    `resume`: continue from the state a stopped run left in OUT/state (see server.rundir). `scoring`:
    [scoring] overrides, keyword arguments of simulations.scenario.load_scenario (clip_norm, epsilon, ...).
    `oracle`: also make the same devices' plans from their pooled data (simulations.oracle) and add the
    federation's gap to it to the report."""
    scenario = load_scenario(path_or_name, devices=devices, out_dir=out_dir, base_model_dir=base_model_dir,
                             **(scoring or {}))
    ensure_base_model(scenario.settings, may_pretrain=base_model_dir is None)
    _, card = load_model(scenario.settings.base_model_dir)  # a damaged model fails here, before Ray starts
    scenario = resolve(scenario, card)
    settings = replace(scenario.settings, resume=resume)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)

    from flwr.simulation import run_simulation

    from server.app import make_server_app
    from simulations.app import make_simulated_client_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    with stop_on_signals():
        run_simulation(server_app=make_server_app(settings), client_app=make_simulated_client_app(scenario.fleet),
                       num_supernodes=settings.devices, backend_config=backend_config(num_cpus))
    wall = time.perf_counter() - start
    report_path = out / "report.json"
    if not report_path.is_file():
        raise RuntimeError(f"the federation ended without a report in {out} (see the log above)")
    report = json.loads(report_path.read_text())
    if oracle:
        from simulations.oracle import run_oracle

        result = run_oracle(scenario, report)
        report["summary"]["oracle"] = {k: v for k, v in result.items() if k != "devices"}
        report["oracle_devices"] = result["devices"]
        report_path.write_text(json.dumps(report, indent=2))
        with (out / "report.md").open("a") as md:
            md.write(f"\nPooled-data oracle (the same plans made centrally from every device's scoring data, same "
                     f"recovery): mean delta_m {result['delta_m_oracle_mean']:.2f}; the federation's mean gap to it "
                     f"{result['gap_mean']:+.2f} points ({result['same_plans']} of {len(result['devices'])} plans "
                     f"identical).\n")
    summary = report["summary"]
    summary["wall_seconds"] = round(wall, 1)
    summary["report_dir"] = str(out)
    return summary


__all__ = ["backend_config", "end_descendants", "ensure_base_model", "run_scenario", "stop_on_signals"]
