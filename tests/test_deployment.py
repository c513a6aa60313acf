"""Deployment on Flower's Deployment Engine: a real SuperLink and SuperNodes on 127.0.0.1, with TLS and
SuperNode authentication, running the whole federation (`server.app:app`); plus fast tests of the pieces
(certificates and keys, connection file, run-config quoting, final-status checks, `cutfl run` exit codes).

Certificates and keys are made in Python (`deploy.certs`, `cryptography`), and the Flower executables are
taken from the directory of `sys.executable`, so the test needs neither `openssl`/`ssh-keygen` nor the
venv's bin/ on PATH. Every process it starts is stopped at the end (`deploy.local.LocalFederation`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_federation import tiny_model_dir as federation_tiny_model_dir

REPO = Path(__file__).resolve().parent.parent

# Three devices, each with its own tasks and budget (node config, as a real device is started).
NODES = {
    "cam-0": {"tasks": "seg,depth", "budget": 0.5, "device-class": "board"},
    "cam-1": {"tasks": "normals", "budget": "macs=0.6", "device-class": "phone"},
    "cam-2": {"tasks": "seg,depth,normals", "budget": 0.7, "device-class": "edge", "priority": "seg=2,depth=1"},
}


def tiny_model_dir(root: Path) -> Path:
    """The federation tests' tiny model, trained a little less (this test is about the transport)."""
    return federation_tiny_model_dir(root, samples=64, epochs=1)


def scenario_file(root: Path, base: Path, devices: int) -> Path:
    """The smallest useful federation: base weights in the messages, no fine-tuning rounds."""
    text = f"""
[scenario]
name = "deployment-test"
devices = {devices}

[model]
base = "{base}"
transport = "arrays"

[data]
samples_per_device = 16
min_samples = 6

[scoring]
num_batches = 1
batch_size = 8

[planning]
round_to = 4
min_channels = 4

[finetune]
rounds = 0

[evaluation]
batch_size = 8

[device]
bn_batches = 1
bn_batch_size = 8

[timeouts]
nodes = 180
profile = 120
score = 180
deliver = 180
evaluate = 180

[fleet]
tasks = ["seg", "depth", "normals"]
"""
    path = root / "scenario.toml"
    path.write_text(text)
    return path


def _verified_model(store_dir: Path):
    """(model, card) of the model a node holds as active, with its weights' sha256 verified."""
    from client.store import ModelStore

    assert (store_dir / ModelStore.ACTIVE).is_file(), f"{store_dir}: no active model"
    return ModelStore(store_dir).verify_active()  # raises ValidationError on a hash or plan mismatch


def cutfl_run(fed, *args: str) -> subprocess.CompletedProcess:
    """`cutfl run CONN ...` as a user runs it (a separate process, the federation's FLWR_HOME)."""
    return subprocess.run([sys.executable, "-m", "cutfl", "run", fed.connection, "--poll", "2", "--timeout", "480",
                           *args], capture_output=True, text=True, env=fed.env, cwd=REPO, timeout=600)


def _logs_of_failed_run(fed, stderr: str) -> str:
    from deploy.flwr_run import run_logs

    found = re.search(r"run (\d+) ", stderr)
    return run_logs(fed.connection, int(found.group(1)), env=fed.env) if found else ""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink (TLS + node auth) + 3 registered SuperNodes + 1 unregistered one; one full run."""
    from deploy.certs import generate
    from deploy.local import LocalFederation

    root = tmp_path_factory.mktemp("deployment")
    base = tiny_model_dir(root)
    scenario = scenario_file(root, base, devices=len(NODES))
    certs = generate(root / "certs", "127.0.0.1", nodes=len(NODES) + 1)
    start = time.monotonic()
    with LocalFederation(root / "fed", certs=certs) as fed:
        fed.start_superlink()
        node_ids = [fed.register(certs.node_public(i), name=name) for i, name in enumerate(NODES)]
        stores = {}
        for i, (name, cfg) in enumerate(NODES.items()):
            stores[name] = root / "stores" / name
            fed.start_supernode(name, {"device-id": name, **cfg, "partition-id": i, "num-partitions": len(NODES),
                                       "store-dir": str(stores[name])}, key=certs.node_keys[i])
        intruder = fed.start_supernode("intruder", {"device-id": "intruder", "tasks": "seg", "budget": 0.5},
                                       key=certs.node_keys[len(NODES)])  # never registered
        run = cutfl_run(fed, "--scenario", str(scenario), "--base-model", str(base), "--out", str(root / "out"))
        result = json.loads(run.stdout) if run.returncode == 0 else {}
        logs = "" if run.returncode == 0 else _logs_of_failed_run(fed, run.stderr)
        # A run whose ServerApp fails: `flwr run` still exits 0, `cutfl run` must not.
        failed = cutfl_run(fed, "--scenario", str(scenario), "--base-model", str(root / "no-such-model"),
                           "--out", str(root / "out-failed"), "--timeout", "120")
        try:
            intruder.popen.wait(timeout=60)
        except Exception:  # noqa: BLE001 - reported by the test below
            pass
        state = {
            "run": run, "result": result, "logs": logs, "failed": failed, "node_ids": node_ids, "stores": stores,
            "root": root,
            # the whole log: how many retry lines its SuperExec writes after the refusal depends on timing
            "intruder_code": intruder.popen.poll(), "intruder_log": intruder.log.read_text(errors="replace"),
            "alive": {p.name: p.alive() for p in fed.processes},
            "tails": {p.name: p.tail(30) for p in fed.processes},
        }
    state["seconds"] = time.monotonic() - start
    state["leftovers"] = fed.leftovers + [p.popen.pid for p in fed.processes if p.popen.poll() is None]
    state["superlink_log"] = fed.processes[0].log.read_text(errors="replace")
    print(f"deployment: {result or run.stderr.strip()}; failing run: {failed.stderr.strip()}; "
          f"fixture {state['seconds']:.1f} s", file=sys.stderr)
    return state


@pytest.mark.slow
def test_federation_completes_on_a_real_superlink_with_tls_and_node_auth(deployment):
    run = deployment["run"]
    assert run.returncode == 0, f"{run.stderr}\n{deployment['logs'][-3000:]}\n{deployment['tails']}"
    assert deployment["result"]["status"] == "finished:completed"
    assert len(set(deployment["node_ids"])) == len(NODES)
    report = json.loads((deployment["root"] / "out" / "report.json").read_text())
    devices = {d["device_id"]: d for d in report["devices"]}
    assert set(devices) == set(NODES)  # the unregistered node never took part
    for name, cfg in NODES.items():
        d = devices[name]
        assert d["status"] == "ok", d["reason"]
        assert tuple(d["tasks"]) == tuple(cfg["tasks"].split(","))
        assert set(d["metrics_compact"]) == set(cfg["tasks"].split(","))
    assert all(deployment["alive"][name] for name in NODES), deployment["tails"]
    assert not deployment["leftovers"]


@pytest.mark.slow
def test_every_node_stores_a_verified_compact_model_with_exactly_its_tasks(deployment):
    assert deployment["run"].returncode == 0, deployment["run"].stderr
    report = json.loads((deployment["root"] / "out" / "report.json").read_text())
    held = {d["device_id"]: d for d in report["devices"]}
    for name, cfg in NODES.items():
        tasks = cfg["tasks"].split(",")
        model, card = _verified_model(deployment["stores"][name])
        assert list(card["tasks"]) == tasks
        assert model.task_names == tasks  # exactly its heads, nothing else
        assert card["arrays_sha256"] == held[name]["weights_sha256"]  # what the server recorded it holds


@pytest.mark.slow
def test_cutfl_run_fails_when_the_run_fails(deployment):
    failed = deployment["failed"]
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    # the run's live log comes first (indented); the verdict is one line, the last one
    errors = [line for line in lines if line.startswith("cutfl run: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "finished:failed" in lines[-1], lines
    assert all(line.startswith(("  ", "cutfl run: ")) for line in lines), lines


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused(deployment):
    code, log = deployment["intruder_code"], deployment["intruder_log"]
    assert code not in (None, 0), f"the unregistered SuperNode is still running or exited 0:\n{log[-4000:]}"
    assert "Failed to activate SuperNode" in log, log[-4000:]
    # The SuperLink refused it for its key, not for some other reason.
    assert "No SuperNode found with the given public key" in deployment["superlink_log"]


@pytest.mark.slow
def test_local_federation_stops_everything_on_failure(tmp_path):
    """An exception inside the `with` block still ends the SuperLink, the SuperNode and their SuperExecs."""
    from deploy.local import LocalFederation, _exists, _started_for, descendants

    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), LocalFederation(tmp_path) as fed:  # insecure: no certs
        fed.start_superlink()
        fed.start_supernode("n0", {"tasks": "seg"})
        guards = [p.popen.pid for p in fed.processes]  # deploy/guard.py, each above its Flower process

        def started() -> list[int]:
            return guards + [d for pid in guards for d in descendants(pid)]

        deadline = time.monotonic() + 600  # a bound against hanging only: how long startup takes is not tested
        while time.monotonic() < deadline and len(_started_for(started())) < 2:  # both SuperExecs up
            time.sleep(0.5)
        pids = started() + _started_for(started())
        assert len(_started_for(started())) >= 2 and len(set(pids)) >= 6, pids
        raise RuntimeError("boom")
    assert not fed.leftovers
    assert not [pid for pid in pids if _exists(pid)]


# ------------------------------------------------------------------------------ pieces, fast


def test_certificates_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from deploy.certs import generate, san_names

    certs = generate(tmp_path / "c", "link.example.org", nodes=2, extra_hosts=("10.0.0.5",))
    for private in (certs.ca_key, certs.server_key, *certs.node_keys):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600, private
    names = san_names(certs.server_cert)
    assert {"link.example.org", "10.0.0.5", "localhost", "127.0.0.1", "::1"} <= set(names)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    for i, key_path in enumerate(certs.node_keys):
        key = load_ssh_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public_text = certs.node_public(i).read_bytes()
        assert public_text.startswith(b"ecdsa-sha2-nistp384 ")
        assert load_ssh_public_key(public_text).public_numbers() == key.public_key().public_numbers()
    # Flower's own loader accepts the public key (what `flwr supernode register` reads).
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(certs.node_public(0))


def test_connection_file_is_what_flower_reads(tmp_path):
    from flwr.cli.flower_config import parse_superlink_connection

    from deploy.flwr_run import write_connection

    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    path = write_connection("lab", "127.0.0.1:9093", root_certificates=ca, home=tmp_path, default=True)
    write_connection("dev", "127.0.0.1:9091", insecure=True, home=tmp_path)
    import tomllib

    data = tomllib.loads(path.read_text())
    assert data["superlink"]["default"] == "lab"
    lab = parse_superlink_connection(data["superlink"]["lab"], "lab")
    assert lab.address == "127.0.0.1:9093" and lab.root_certificates == str(ca.resolve()) and not lab.insecure
    assert parse_superlink_connection(data["superlink"]["dev"], "dev").insecure
    with pytest.raises(ValueError):
        write_connection("bad", "x:1", home=tmp_path)  # neither TLS nor insecure


def test_run_config_and_node_config_quoting():
    from flwr.common.config import parse_config_args

    from deploy.flwr_run import run_config_args
    from deploy.local import node_config_arg

    config = {"scenario": "/tmp/a b/s.toml", "devices": 3, "base-model": "/m", "flag": True}
    args = run_config_args(config)
    assert parse_config_args(args[1::2]) == config
    node = {"device-id": "cam-0", "tasks": "seg,depth", "budget": "macs=0.6", "partition-id": 0, "alpha": 0.5}
    assert parse_config_args([node_config_arg(node)]) == node


def test_final_status_decides_success():
    from deploy.flwr_run import RunError, RunResult, exit_code, run_id_from_output, status_from_output

    assert run_id_from_output('{"success": true, "run-id": "42", "federation-id": ""}') == 42
    with pytest.raises(RunError, match="unavailable"):  # Flower puts the captured output first, the error last
        run_id_from_output('{"success": false, "error-message": "Using SuperLink: x\\n\\nConnection to the '
                           'SuperLink is unavailable."}')
    ls = '\x1b[1m{\x1b[0m "success": true, "runs": [{"run-id": "42", "status": "finished:failed", ' \
         '"status-details": "ServerApp raised"}]}'
    assert status_from_output(ls, 42) == ("finished:failed", "ServerApp raised")
    assert exit_code(RunResult(42, "finished:failed", "", 1.0)) == 1
    assert exit_code(RunResult(42, "finished:stopped", "", 1.0)) == 1
    assert exit_code(RunResult(42, "timeout:running", "", 1.0)) == 1
    assert exit_code(RunResult(42, "finished:completed", "", 1.0)) == 0


def _fake_flwr(monkeypatch, final_status: str) -> list[list[str]]:
    """Replace the `flwr` subprocess with canned JSON answers; returns the calls made."""
    from deploy import flwr_run

    monkeypatch.setattr(flwr_run, "check_connection", lambda connection, env=None: None)
    # no real `flwr log --stream` beside the canned answers: its output would race with the assertions
    monkeypatch.setattr(flwr_run, "LogFollower", lambda connection, run_id, on_line, env=None: contextlib.nullcontext())

    calls: list[list[str]] = []

    def fake(args, env, timeout):
        calls.append(list(args))
        if args[0] == "run":
            out = '{"success": true, "run-id": "7"}'
        elif args[0] == "ls":
            status = "running" if sum(c[0] == "ls" for c in calls) == 1 else final_status
            out = json.dumps({"success": True, "runs": [{"run-id": "7", "status": status,
                                                         "status-details": "boom" if "failed" in status else ""}]})
        else:
            out = '{"success": true}'
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(flwr_run, "_flwr", fake)
    return calls


def test_cutfl_run_exits_non_zero_with_one_line_when_the_run_failed(monkeypatch, capsys, tmp_path):
    from cutfl.cli import main

    calls = _fake_flwr(monkeypatch, "finished:failed")
    code = main(["run", "lab", "--scenario", str(tmp_path / "s.toml"), "--poll", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    # one line: the run, its final status and Flower's details (the seconds it took are whatever they were)
    assert len(err) == 1 and re.fullmatch(r"cutfl run: error: run 7 finished:failed after \d+ s \(boom\)", err[0]), err
    assert [c[0] for c in calls].count("ls") == 2  # polled until the status was final: running, then failed
    run_call = calls[0]
    assert run_call[:3] == ["run", str(REPO), "lab"] and "--format" in run_call
    assert f"scenario='{tmp_path / 's.toml'}'" in run_call


def test_cutfl_run_exits_zero_only_when_completed(monkeypatch, capsys):
    from cutfl.cli import main

    _fake_flwr(monkeypatch, "finished:completed")
    assert main(["run", "lab", "--poll", "0.01"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "finished:completed"


def test_cutfl_run_times_out_and_stops_the_run(monkeypatch, capsys):
    from cutfl.cli import main

    calls = _fake_flwr(monkeypatch, "running")
    assert main(["run", "lab", "--poll", "0.01", "--timeout", "0.05"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run 7 timeout:running" in err[0] and "not finished after" in err[0], err
    assert [c[0] for c in calls][0] == "run" and "ls" in [c[0] for c in calls]
    assert calls[-1][:3] == ["stop", "7", "lab"]  # the run is stopped, once, and nothing after that
    assert [c[0] for c in calls].count("stop") == 1


def test_status_polling_retries_then_gives_up(monkeypatch):
    from deploy import flwr_run

    iterator = iter([flwr_run.RunError("unreachable"), ("running", ""), ("finished:completed", "")])

    def fake_status(connection, run_id, env=None):
        answer = next(iterator)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(flwr_run, "run_status", fake_status)
    assert flwr_run.wait_for_run("lab", 7, poll=0.01).ok  # one failed query is not the end
    monkeypatch.setattr(flwr_run, "run_status", lambda *a, **k: (_ for _ in ()).throw(flwr_run.RunError("down")))
    with pytest.raises(flwr_run.RunError, match="down"):
        flwr_run.wait_for_run("lab", 7, poll=0.01, max_errors=2)


def test_cutfl_certs_writes_files(tmp_path, capsys):
    from cutfl.cli import main

    assert main(["certs", "--host", "127.0.0.1", "--out", str(tmp_path / "c"), "--nodes", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["node_keys"][0]).is_file() and Path(out["node_public_keys"][0]).is_file()
    assert "127.0.0.1" in out["server_names"]


def test_cutfl_connect_writes_the_connection(tmp_path, monkeypatch, capsys):
    import tomllib

    from cutfl.cli import main

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert main(["connect", "dev", "--address", "127.0.0.1:9093", "--insecure", "--default"]) == 0
    data = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert data["superlink"] == {"default": "dev", "dev": {"address": "127.0.0.1:9093", "insecure": True}}
    assert main(["connect", "lab", "--address", "x:1", "--root-certificates", str(tmp_path / "missing.crt")]) == 1
    assert main(["run", "lab", "--timeout", "1"]) == 1  # not written: one line naming the file, no flwr call
    assert "no SuperLink connection 'lab'" in capsys.readouterr().err
