"""CLI: bad input ends with exactly one readable line and a non-zero exit; a tiny pretrain, prune and bench work."""

import json
import math
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "CUTFL_NO_PROGRESS": "1"}


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cutfl", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["pretrain", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["pretrain", "--epochs", "x"], "is not an integer"),
        (["pretrain", "--width", "-1"], "must be > 0"),
        (["evaluate", "--model", "/definitely/not/here"], "not a directory holding a cut-fl model"),
        (["evaluate"], "--model"),
        (["nosuchcommand"], "invalid choice"),
        (["pretrain", "--dataset", "multifashion", "--data-dir", "/nonexistent-dir"], "fashion"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, fragment):
    proc = run_cli(*args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment.lower() in lines[0].lower()


def test_not_a_model_dir_is_one_line(tmp_path):
    (tmp_path / "model.json").write_text("{not json")
    (tmp_path / "weights.pt").write_bytes(b"")
    proc = run_cli("evaluate", "--model", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "not valid JSON" in proc.stderr


def test_tiny_pretrain_then_evaluate(tmp_path):
    out = tmp_path / "m"
    proc = run_cli("pretrain", "--dataset", "scenes", "--epochs", "1", "--train-samples", "32",
                   "--test-samples", "16", "--width", "0.125", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["metrics"]) == {"seg", "depth", "normals"}
    card = json.loads((out / "model.json").read_text())
    assert card["weights_sha256"] == report["weights_sha256"]
    # The federation gives devices scenes from another seed only when the card names the training seed.
    assert card["dataset_kwargs"]["seed"] == 0
    proc = run_cli("evaluate", "--model", str(out), "--test-samples", "16")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)["metrics"]
    assert metrics["seg"]["miou"] == pytest.approx(report["metrics"]["seg"]["miou"])


# ------------------------------------------------------------------ prune and bench on a tiny model, in process

PRUNE_TASKS = ["depth", "normals"]  # metrics that are never 0 on an untrained model (delta_m is relative)
SMALL = ["--train-samples", "16", "--test-samples", "8", "--num-batches", "2", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny model saved as `cutfl pretrain` would: (directory, card)."""
    import torch

    from cut.checkpoint import load_model, save_model
    from cut.data.scenes import scene_tasks
    from cut.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16))
    root = tmp_path_factory.mktemp("cli") / "base"
    save_model(root, model, {"dataset": "scenes", "dataset_kwargs": {"size": 32, "seed": 0},
                             "test_kwargs": {"size": 32, "seed": 1}})
    return root, load_model(root)[1]


def _main(args: list[str], capsys) -> tuple[int, str, list[str]]:
    from cutfl.cli import main

    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_prune_writes_a_compact_model_within_budget(tiny_model, tmp_path, capsys):
    from cut.checkpoint import load_model
    from cut.metrics import delta_m
    from cut.models import count_params
    from cut.plan import PruningPlan

    base_dir, card = tiny_model
    out = tmp_path / "compact"
    code, stdout, err = _main(["prune", "--model", str(base_dir), "--tasks", ",".join(PRUNE_TASKS),
                               "--budget", "params=0.5", "--out", str(out), *SMALL], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["tasks"] == PRUNE_TASKS and summary["method"] == "cut" and summary["out"] == str(out)
    assert summary["budget"] == {"kind": "params", "value": 0.5}
    compact, compact_card = load_model(out)
    base, _ = load_model(base_dir)
    dense = base.decompose(PRUNE_TASKS)
    assert compact.task_names == PRUNE_TASKS  # exactly the selected heads
    assert summary["params"] == count_params(compact)
    assert summary["params_ratio"] == pytest.approx(count_params(compact) / count_params(dense))
    assert 0.25 < summary["params_ratio"] <= 0.5 + 1e-9  # within budget, and not pruned to nothing
    plan = PruningPlan.from_json((out / "plan.json").read_text())
    assert plan.to_dict() == compact_card["plan"] and plan.tasks == tuple(PRUNE_TASKS)
    assert plan.base_model_sha256 == compact_card["base_model_sha256"] == card["weights_sha256"]
    assert (plan.budget_kind, plan.budget_value) == ("params", 0.5)
    report = json.loads((out / "report.json").read_text())
    assert report["delta_m"] == summary["delta_m"] and report["plan_hash"] == plan.plan_hash
    primary = {t: base.config.task(t).primary_metric for t in PRUNE_TASKS}
    higher = {t: base.config.task(t).higher_is_better for t in PRUNE_TASKS}
    metrics = report["metrics"]
    assert summary["delta_m"] == pytest.approx(delta_m({t: metrics["compact"][t][primary[t]] for t in PRUNE_TASKS},
                                                       {t: metrics["dense"][t][primary[t]] for t in PRUNE_TASKS},
                                                       higher))
    assert compact_card["metrics"] == metrics["compact"]
    assert len(err) == 1 and err[0].startswith("cutfl prune: done in")  # nothing else on stderr (--quiet)
    # a macs budget is honoured on MACs
    code, stdout, err = _main(["prune", "--model", str(base_dir), "--tasks", ",".join(PRUNE_TASKS),
                               "--budget", "macs=0.6", "--out", str(tmp_path / "macs"), *SMALL], capsys)
    assert code == 0, err
    assert json.loads(stdout)["macs_ratio"] <= 0.6 + 1e-9


@pytest.mark.parametrize(("args", "fragment"), [
    (["--tasks", "depth,sky"], "sky"),
    (["--budget", "params=1.5"], "(0, 1]"),
    (["--method", "no-such-method"], "no-such-method"),
])
def test_prune_bad_input_is_one_line(tiny_model, tmp_path, capsys, args, fragment):
    base = ["prune", "--model", str(tiny_model[0]), "--tasks", "depth", "--out", str(tmp_path / "x")]
    code, _, err = _main(base + args + SMALL, capsys)
    assert code != 0 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "x" / "model.json").exists()


def test_bench_compares_methods_on_the_same_data(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench"
    code, stdout, err = _main(["bench", "--model", str(tiny_model[0]), "--tasks", ",".join(PRUNE_TASKS),
                               "--budgets", "0.5", "--methods", "random,cut", "--seeds", "1", "--out", str(out),
                               *SMALL], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["budget"], r["seed"]): r for r in results["rows"]}
    assert set(rows) == {("random", 0.5, 0), ("cut", 0.5, 0)}
    for row in rows.values():
        assert row["params_ratio"] <= 0.5 + 1e-9 and math.isfinite(row["delta_m"])
        assert set(row["metrics"]) == set(PRUNE_TASKS)
    assert stdout == (out / "results.md").read_text() + "\n"  # the table is printed as written
    lines = stdout.splitlines()
    assert lines[0] == "# Pruning methods compared (scenes, tasks depth,normals)"
    assert f"| random | baseline | {rows[('random', 0.5, 0)]['delta_m']:.2f} ± 0.00 |" in lines
    assert f"| cut | cut | {rows[('cut', 0.5, 0)]['delta_m']:.2f} ± 0.00 |" in lines
    assert (out / "delta_m_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = _main(["bench", "--model", str(tiny_model[0]), "--methods", "random,nope", "--out",
                          str(tmp_path / "b2"), *SMALL], capsys)
    assert code == 1 and len(err) == 1 and "nope" in err[0], err
    code, _, err = _main(["bench", "--model", str(tiny_model[0]), "--budgets", "0.5,1.5"], capsys)
    assert code != 0 and len(err) == 1 and "outside (0, 1]" in err[0], err


# ------------------------------------------------------------------------------ issue 14: feedback


def test_every_subcommand_help_opens_with_a_description():
    from cutfl.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    listed = {a.dest: a.help for a in sub._choices_actions}
    assert set(listed) == set(sub.choices)
    for name, command in sub.choices.items():
        assert listed[name], f"`cutfl --help` lists {name} without a description"
        assert command.description and len(command.description) > 10, f"`cutfl {name} --help` has no description"


@pytest.mark.parametrize("damage", ["bad-card", "bad-weights", "empty-dir"])
def test_simulate_with_a_damaged_base_model_fails_at_once(tmp_path, damage):
    import time

    base = tmp_path / "base"
    base.mkdir()
    if damage == "bad-card":
        (base / "model.json").write_text("{not json")
        (base / "weights.pt").write_bytes(b"\0" * 16)
    elif damage == "bad-weights":
        from cut.checkpoint import save_model
        from cut.data.scenes import scene_tasks
        from cut.models import ModelConfig, build_model

        save_model(base, build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=8)),
                   {"dataset": "scenes"})
        (base / "weights.pt").write_bytes(b"PK\x03\x04 truncated")
    start = time.monotonic()
    proc = run_cli("simulate", "--devices", "2", "--base-model", str(base), "--out", str(tmp_path / "out"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("cutfl simulate: error:") and str(base) in lines[0]
    assert "ray" not in proc.stderr.lower() and time.monotonic() - start < 60  # refused before Ray starts


def test_scenario_with_a_non_integer_device_count_names_the_key(tmp_path):
    scenario = tmp_path / "many.toml"
    scenario.write_text('[scenario]\ndevices = "many"\n')
    proc = run_cli("simulate", str(scenario), "--out", str(tmp_path / "out"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "[scenario] devices" in lines[0] and "integer" in lines[0] and "int()" not in lines[0]


def test_segmentation_images_come_with_a_colour_legend(tmp_path):
    import numpy as np
    from PIL import Image

    from cut.infer import _render, palette

    names = ["floor", "wall", "rug"]
    logits = np.zeros((3, 4, 4), dtype=np.float32)
    logits[2, :, :2] = 1.0  # left half rug, right half floor
    task = {"name": "seg", "kind": "segmentation", "class_names": names}
    info = _render(task, logits, (8, 8), tmp_path / "x.seg.png")
    assert set(info["fractions"]) == {"floor", "rug"}
    legend = Image.open(info["legend"]).convert("RGB")
    assert info["legend"] == str(tmp_path / "legend.seg.png") and legend.height >= 3 * 14
    pixels = {legend.getpixel((10, 6 + i * 20 + 7)) for i in range(len(names))}  # one swatch per class, in order
    assert pixels == {tuple(int(c) for c in colour) for colour in palette(3)}


def test_run_reads_the_federation_summary_from_the_log_and_knows_local_simulations(tmp_path):
    from deploy import flwr_run
    from server import report

    assert flwr_run.SUMMARY_PREFIX == report.SUMMARY_PREFIX
    log = ("INFO : Starting\nscore: 20/20 answered 20, excluded 0\n"
           "\x1b[0mcutfl report: {\"status\": \"ok\", \"devices_ok\": 19, \"devices_expected\": 20, \"delta_m_mean\": -1.5}\n"
           "INFO : done\n")
    assert flwr_run.report_summary(log) == {"status": "ok", "devices_ok": 19, "devices_expected": 20,
                                            "delta_m_mean": -1.5}
    assert flwr_run.report_summary("nothing here\ncutfl report: {broken") is None
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n'
                                          '[superlink.lab]\naddress = "10.0.0.1:9093"\ninsecure = true\n')
    env = {"FLWR_HOME": str(tmp_path)}
    assert flwr_run.is_local_simulation("local", env) and not flwr_run.is_local_simulation("lab", env)
    assert not flwr_run.is_local_simulation("missing", env)
    fresh = {"FLWR_HOME": str(tmp_path / "fresh")}  # no config.toml yet: Flower's own `local` simulation
    assert flwr_run.is_local_simulation("local", fresh) and not flwr_run.is_local_simulation("lab", fresh)
    flwr_run.check_connection("local", fresh)
    assert flwr_run.flwr_env(base={})["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_log_follower_hands_over_lines_as_they_come_and_stops_its_process():
    import threading

    from deploy.flwr_run import LogFollower

    got, second = [], threading.Event()

    def on_line(line):
        got.append(line)
        if len(got) == 2:
            second.set()

    follower = LogFollower("conn", 1, on_line, env=dict(os.environ))
    follower.command = [sys.executable, "-u", "-c",
                        "import time; print('\\x1b[92mprofile: 1/2\\x1b[0m'); print('profile: 2/2'); time.sleep(120)"]
    with follower:
        assert second.wait(30)
        process = follower.process
    assert got == ["profile: 1/2", "profile: 2/2"]
    assert process.poll() is not None  # stopped with the context, not left running


def test_flwr_run_client_app_plays_the_scenario_fleet_on_simulated_supernodes_only(tmp_path):
    from types import SimpleNamespace

    from cut.checkpoint import save_model
    from cut.data.scenes import scene_tasks
    from cut.models import ModelConfig, build_model
    from simulations.app import RunConfigIdentity
    from simulations.fleet import assign
    from simulations.scenario import load_scenario

    save_model(tmp_path / "base", build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32),
                                                          head_hidden=8)), {"dataset": "scenes"})
    identify = RunConfigIdentity()
    run_config = {"scenario": "default", "devices": 4, "out-dir": str(tmp_path / "out"),
                  "base-model": str(tmp_path / "base")}
    simulated = identify(SimpleNamespace(node_config={"partition-id": 2, "num-partitions": 4}, run_config=run_config),
                         None)
    expected = assign(load_scenario("default", devices=4).fleet, 2, 4)
    assert (simulated.device_id, simulated.tasks) == (expected.device_id, expected.tasks)
    assert simulated.store_root == str((tmp_path / "out" / "store").resolve())
    real = identify(SimpleNamespace(node_config={"tasks": "seg", "budget": 0.5, "device-id": "cam-0"},
                                    run_config=run_config), None)
    assert (real.device_id, real.tasks) == ("cam-0", ("seg",))
    with pytest.raises(ValueError, match="names no tasks"):  # a real SuperNode is never given a fleet identity
        identify(SimpleNamespace(node_config={}, run_config=run_config), None)
