"""The benchmark runner: same data for every method, the recovery budget in every table, paired statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cut.bench import comparisons, expand_methods, paired_interval, run_bench, t975
from cut.budget import BudgetOptions
from cut.data import get_dataset
from cut.data.scenes import scene_tasks
from cut.models import ModelConfig, build_model
from cut.pipeline import RecoveryConfig, Samples, seed_data

TASKS = ["seg", "normals"]
OPTIONS = BudgetOptions(round_to=2, min_channels=2)


@pytest.fixture(scope="module")
def data():
    train = get_dataset("scenes", "train", num_samples=12, size=32, seed=0)
    test = get_dataset("scenes", "test", num_samples=4, size=32, seed=0)
    return train, test


def tiny_base():
    torch.manual_seed(0)
    return build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16)).eval()


def _bench(data, methods, out, seeds=(0,), budgets=(0.5,), steps=2, structured=True, workers=1):
    return run_bench(tiny_base(), data, TASKS, list(budgets), methods, list(seeds), 0, out, structured=structured,
                     sparsity=0.7, batch_size=4, num_batches=2, options=OPTIONS, progress=False,
                     recovery=RecoveryConfig(steps=steps, batch_size=4), workers=workers)


def _by_cell(results):
    return {(r["method"], r["budget"], r["seed"]): r for r in results["rows"]}


def test_reordering_methods_changes_no_result_bit(data, tmp_path):
    # random draws channels, snip and cut score on the data, all recover on it: any shared iterator or
    # global random state between cells would change a later method's numbers.
    forward = _bench(data, ["random", "snip", "cut"], tmp_path / "a", budgets=(0.5, 0.7))
    backward = _bench(data, ["cut", "snip", "random"], tmp_path / "b", budgets=(0.7, 0.5))
    alone = _bench(data, ["cut"], tmp_path / "c", budgets=(0.5,))
    a, b, c = _by_cell(forward), _by_cell(backward), _by_cell(alone)
    assert a.keys() == b.keys()
    for key, row in a.items():
        other = b[key]
        assert row["plan_hash"] == other["plan_hash"]
        assert row["delta_m"] == other["delta_m"] and row["delta_m_before_recovery"] == other["delta_m_before_recovery"]
        assert row["metrics"] == other["metrics"]
    assert c[("cut", 0.5, 0)]["delta_m"] == a[("cut", 0.5, 0)]["delta_m"]
    assert c[("cut", 0.5, 0)]["metrics"] == a[("cut", 0.5, 0)]["metrics"]


def test_worker_processes_give_the_same_bits(data, tmp_path):
    assert torch.get_num_threads() == 1  # tests/conftest.py: workers run one thread, so must the serial run
    serial = _bench(data, ["l1", "cut"], tmp_path / "serial", seeds=(0, 1))
    forked = _bench(data, ["l1", "cut"], tmp_path / "forked", seeds=(0, 1), workers=2)
    assert [(r["method"], r["seed"]) for r in serial["rows"]] == [(r["method"], r["seed"]) for r in forked["rows"]]
    for a, b in zip(serial["rows"], forked["rows"], strict=True):
        assert a["plan_hash"] == b["plan_hash"] and a["delta_m"] == b["delta_m"] and a["metrics"] == b["metrics"]


def test_seed_data_is_a_function_of_the_seed(data):
    train = Samples.from_dataset(data[0])  # 12 samples
    cfg = RecoveryConfig(steps=2, batch_size=4)
    one, again, other = seed_data(train, 3, 4, 2, cfg), seed_data(train, 3, 4, 2, cfg), seed_data(train, 4, 4, 2, cfg)
    assert len(one.scoring) == 2 and len(one.recovery) == 2  # 2 steps x 4 samples
    for a, b in [*zip(one.scoring, again.scoring, strict=True), *zip(one.recovery, again.recovery, strict=True)]:
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert not torch.equal(one.scoring[0][0], other.scoring[0][0])
    # the scoring batches do not depend on the recovery budget; recovery holds min(N, steps x batch) samples
    longer = seed_data(train, 3, 4, 2, RecoveryConfig(steps=50, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one.scoring, longer.scoring, strict=True))
    assert len(longer.recovery) == 3 and sum(len(x) for x, _ in longer.recovery) == len(train)
    assert len({x.numpy().tobytes() for batch, _ in longer.recovery for x in batch}) == len(train)


def test_bench_tables_state_the_recovery_budget_and_compare_cut(data, tmp_path):
    results = _bench(data, ["random", "l1", "cut", "cut-summed"], tmp_path, seeds=(0, 1))
    assert len(results["rows"]) == 8
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert {"method", "budget", "seed", "delta_m", "delta_m_before_recovery", "params_ratio", "macs_ratio",
            "metrics"} <= set(on_disk["rows"][0])
    assert on_disk["config"]["recovery"]["steps"] == 2 and on_disk["config"]["machine"]["cores"] >= 1
    md = (tmp_path / "results.md").read_text()
    assert md.count("2 steps x 4") >= 3  # the heading, the after-recovery table, the per-task table
    assert "## Before recovery" in md and "| cut | cut |" in md and "| cut-summed | ablation |" in md
    assert "best other" in md and "±" in md
    comp = comparisons(results)
    assert comp[0.5]["other"] in ("random", "l1")  # ablations are never the "other" method
    assert (tmp_path / "delta_m_vs_budget.png").stat().st_size > 1000


def test_unstructured_bench(data, tmp_path):
    results = _bench(data, ["random", "cut"], tmp_path, structured=False, steps=1)
    assert len(results["rows"]) == 2 and results["config"]["budget_kind"] == "sparsity"
    assert all(r["sparsity"] == pytest.approx(0.7, abs=0.01) for r in results["rows"])


def test_expand_methods():
    assert expand_methods(["magnitude", "cut", "l1"]) == ["l1", "cut"]
    grid = expand_methods(["tp-grid"])
    assert len(grid) == 16 and all(m.startswith("tp-") for m in grid)
    with pytest.raises(ValueError, match="unknown pruning method"):
        expand_methods(["nope"])


def test_paired_interval_by_hand():
    # differences 1, 2, 3: mean 2, sample std 1, half width t(2) / sqrt(3) = 4.303 / 1.732
    p = paired_interval({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    half = 4.303 / math.sqrt(3)
    assert p["mean"] == pytest.approx(2.0) and p["low"] == pytest.approx(2 - half) and p["high"] == pytest.approx(2 + half)
    assert p["verdict"] == "level"  # 2 - 2.48 < 0
    assert paired_interval({0: 5.0, 1: 5.1, 2: 5.2}, {0: 0.0, 1: 0.0, 2: 0.1})["verdict"] == "better"
    assert paired_interval({0: 0.0, 1: 0.0, 2: 0.1}, {0: 5.0, 1: 5.1, 2: 5.2})["verdict"] == "worse"
    assert paired_interval({0: 1.0}, {0: 0.0}) is None
    assert paired_interval({0: 1.0, 1: 2.0}, {1: 0.0, 2: 0.0}) is None  # only one shared seed


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(22) == 2.086 and t975(1000) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_iterative_prunes_in_steps_with_the_same_total_recovery(data, monkeypatch):
    import cut.pipeline as pipeline
    from cut.compact import compact_model
    from cut.models import count_params

    train, test = Samples.from_dataset(data[0]), Samples.from_dataset(data[1])
    recovery = RecoveryConfig(steps=5, batch_size=4)
    d = seed_data(train, 0, 4, 2, recovery)
    planned, stages = [], []
    real_plan, real_recover = pipeline.plan_with, pipeline.recover

    def spy_plan(method, request, **kw):
        planned.append((count_params(request.model), request.budget_value))
        return real_plan(method, request, **kw)

    def spy_recover(student, teacher, batches, config, **kw):
        stages.append((count_params(student), config.steps, kw["seed"]))
        return real_recover(student, teacher, batches, config, **kw)

    monkeypatch.setattr(pipeline, "plan_with", spy_plan)
    monkeypatch.setattr(pipeline, "recover", spy_recover)
    base = tiny_base()
    compact, plan, report = pipeline.prune(base, TASKS, "params", 0.4, "cut", test_loader=test.batches(4), seed=0,
                                           options=OPTIONS, recovery=recovery, scoring_batches=d.scoring,
                                           recovery_batches=d.recovery, progress=False, iterative=3)
    dense = count_params(base.decompose(TASKS))
    # three plans, each of the model the previous step left (re-scored on it), each removing a share of it
    assert len(planned) == 3 and planned[0][0] == dense and planned[1][0] < dense and planned[2][0] < planned[1][0]
    assert planned[0][1] == pytest.approx(0.4 ** (1 / 3))
    # recovery after every step, 5 steps in all (2 + 2 + 1 would also be 5; the remainder goes last), each
    # stage on the model just pruned, with its own visit order
    assert [s[1] for s in stages] == [1, 2, 2] and [s[0] for s in stages] == [p[0] for p in planned[1:]] + [
        count_params(compact)]
    assert len({s[2] for s in stages}) == 3
    assert report["params_ratio"] <= 0.4 + 1e-9 and report["params_ratio"] > 0.3 and report["iterative"] == 3
    assert report["method_info"]["iterative"] == 3 and len(report["method_info"]["step_plans"]) == 3
    # the returned plan is one plan of the decomposed model: applied to it, it gives the compact's shapes
    rebuilt = compact_model(base.decompose(TASKS), plan)
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in compact.named_parameters()}
    assert "delta_m" in report and "delta_m_before_recovery" in report


def test_bench_iterative_is_stated_and_checked(data, tmp_path):
    results = run_bench(tiny_base(), data, TASKS, [0.5], ["l1", "cut"], [0], 0, tmp_path, batch_size=4,
                        num_batches=2, options=OPTIONS, progress=False, recovery=RecoveryConfig(steps=2, batch_size=4),
                        iterative=2)
    assert results["config"]["iterative"] == 2
    assert all(r["method_info"]["iterative"] == 2 for r in results["rows"])
    md = (tmp_path / "results.md").read_text()
    assert "iterative pruning in 2 steps" in md and "Iterative: 2 pruning steps" in md
    with pytest.raises(ValueError, match="iterative"):
        run_bench(tiny_base(), data, TASKS, [0.5], ["cut"], [0], 0, tmp_path, iterative=0, progress=False)
    with pytest.raises(ValueError, match="structured mode only"):
        run_bench(tiny_base(), data, TASKS, [0.5], ["cut"], [0], 0, tmp_path, structured=False, iterative=2,
                  progress=False)


def test_cli_iterative_flag():
    import argparse

    from cutfl.prune_commands import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    assert parser.parse_args(["bench", "--iterative", "3"]).iterative == 3
    assert parser.parse_args(["bench"]).iterative == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--iterative", "0"])


def test_runs_split_by_seed_merge_into_the_one_run(data, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("merge_bench", Path(__file__).parents[1] / "benchmarks" / "merge_bench.py")
    merge_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_bench)
    whole = _bench(data, ["l1", "cut"], tmp_path / "whole", seeds=(0, 1))
    parts = [_bench(data, ["l1", "cut"], tmp_path / f"s{s}", seeds=(s,)) for s in (0, 1)]
    merged = merge_bench.merge(parts)
    assert merged["config"]["seeds"] == [0, 1]
    key = lambda r: (r["seed"], r["budget"], r["method"])  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731  (timings differ)
    assert [strip(r) for r in sorted(merged["rows"], key=key)] == [strip(r) for r in sorted(whole["rows"], key=key)]
    with pytest.raises(ValueError, match="more than one run"):
        merge_bench.merge([parts[0], parts[0]])
    other = _bench(data, ["l1", "cut"], tmp_path / "other", seeds=(1,), steps=1)
    with pytest.raises(ValueError, match="recovery"):
        merge_bench.merge([parts[0], other])
