"""Run a scenario on Flower's simulation engine, in this process, and return its report summary.

The ServerApp runs in a thread of this process with its settings bound directly (`run_simulation` leaves
the run config empty); each simulated device is a ClientApp call inside a Ray actor (one per CPU core),
built with the scenario's fleet bound in (simulations.app): devices know who they are from it, and the
server never sends it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
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


__all__ = ["backend_config", "ensure_base_model", "run_scenario"]
