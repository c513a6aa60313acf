"""The pooled-data oracle: the same devices' plans made centrally, to measure what federating costs.

A central server that held every device's scoring data would score each task once on the pooled samples
of the devices that hold it, plan each device's model from those scores exactly as the federation does
(server.planning: the same fusion, budget and planner), recover each plan the same way (server.recovery)
and hand it over. The oracle does that, then evaluates each compact model as the device would (BatchNorm
re-estimated on the device's own samples, metrics on its held-out samples, against the dense model on the
same samples). The federation's gap to it is the price of keeping the data on the devices.

Only a simulation can run it: it reads every device's data.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from client.data import local_data
from cut import fusion
from cut.budget import BudgetOptions
from cut.compact import recalibrate_batchnorm
from cut.importance import score_tasks, take_batches
from cut.train import evaluate, make_loader, multitask_delta
from server.planning import BaseModel, PlanBook
from server.recovery import recover_plans
from simulations.fleet import assign
from simulations.scenario import Scenario, load_scenario, resolve


def pooled_scores(base: BaseModel, devices: list, scenario: Scenario) -> dict:
    """task -> group -> scores on the pooled training samples of every device that holds the task, with as
    many samples as those devices scored in the federation together."""
    s = scenario.settings.scoring
    per_task = {}
    for task in base.task_names:
        holders = [d for d in devices if task in d.tasks]
        if not holders:
            continue
        pooled = ConcatDataset([local_data(d).train for d in holders])
        used = sum(min(s.num_batches * s.batch_size, len(local_data(d).train)) for d in holders)
        loader = make_loader(pooled, s.batch_size, shuffle=True, seed=scenario.settings.seed)
        torch.manual_seed(scenario.settings.seed)
        scores = score_tasks(base.decomposed((task,)), loader, [task], s.criterion, max(1, used // s.batch_size),
                             scenario.settings.seed)
        per_task[task] = fusion.normalise(scores, "global")[task]
    return per_task


def device_deltas(base: BaseModel, book: PlanBook, plans: dict[str, str], devices: list, settings) -> dict[str, float]:
    """device id -> delta_m of its plan's current weights, measured as the device measures it: BatchNorm
    re-estimated on its samples if the scenario says so, dense and compact on its held-out samples."""
    adoption = settings.device
    out = {}
    for d in devices:
        tasks = list(base.canonical(d.tasks))
        data = local_data(d)
        model = book.model(plans[d.device_id])
        if adoption.recalibrate_bn:
            batches = take_batches(make_loader(data.train, adoption.bn_batch_size), adoption.bn_batches)
            model = recalibrate_batchnorm(copy.deepcopy(model), batches)
        loader = make_loader(data.eval, settings.evaluation.batch_size)
        dense = evaluate(base.decomposed(tuple(tasks)), loader, tasks)
        out[d.device_id] = multitask_delta(base.model, evaluate(model, loader, tasks), dense)
    return out


def completed_devices(scenario: Scenario, report: dict[str, Any]) -> tuple[dict[str, dict], list]:
    """({device id: report entry}, [Device]) of the devices whose run completed, in partition order."""
    ok = {e["device_id"]: e for e in report["devices"] if e["status"] == "ok"}
    n = scenario.settings.devices
    return ok, [d for d in (assign(scenario.fleet, pid, n) for pid in range(n)) if d.device_id in ok]


def finished_run(run_dir: Path, scenario_name: str = "default") -> tuple[Scenario, BaseModel, dict[str, Any]]:
    """A finished `cutfl simulate` run directory, reopened: (its resolved scenario, base model, report)."""
    report = json.loads((run_dir / "report.json").read_text())
    summary = report["summary"]
    scenario = load_scenario(scenario_name, out_dir=run_dir, base_model_dir=summary["base_model"]["dir"],
                             devices=summary["devices_expected"])
    base = BaseModel.load(scenario.settings.base_model_dir)
    return resolve(scenario, base.card), base, report


def run_oracle(scenario: Scenario, report: dict[str, Any]) -> dict[str, Any]:
    """Per device of the federation's report that completed: the oracle's delta_m and the federation's gap."""
    settings = scenario.settings
    base = BaseModel.load(settings.base_model_dir)
    ok, devices = completed_devices(scenario, report)
    start = time.perf_counter()
    per_task = pooled_scores(base, devices, scenario)
    p = settings.planning
    book = PlanBook(base, BudgetOptions(p.min_channels, p.min_fraction, p.round_to), p.normalise)
    plans = {}
    for d in devices:
        tasks = base.canonical(d.tasks)
        plan = book.plan(tasks, d.budget, {t: per_task[t] for t in tasks}, d.priorities,
                         (tasks, d.budget.kind, d.budget.value, tuple(sorted(d.priorities.items()))))
        book.build(plan)
        plans[d.device_id] = plan.plan_hash
    recovery = recover_plans(book, base, settings.recovery)
    deltas = device_deltas(base, book, plans, devices, settings)
    out = []
    for d in devices:
        delta = deltas[d.device_id]
        fed = ok[d.device_id].get("delta_m")
        out.append({"device_id": d.device_id, "delta_m_oracle": delta, "delta_m_federation": fed,
                    "gap": None if fed is None else fed - delta, "same_plan": plans[d.device_id] ==
                    ok[d.device_id]["plan_hash"]})
    gaps = [o["gap"] for o in out if o["gap"] is not None]
    return {"devices": out, "seconds": round(time.perf_counter() - start, 1), "recovery": recovery,
            "delta_m_oracle_mean": statistics.fmean(o["delta_m_oracle"] for o in out) if out else None,
            "gap_mean": statistics.fmean(gaps) if gaps else None,
            "same_plans": sum(o["same_plan"] for o in out)}


__all__ = ["completed_devices", "device_deltas", "finished_run", "pooled_scores", "run_oracle"]
