"""CLI: bad input ends with exactly one readable line and a non-zero exit; a tiny pretrain works."""

import json
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
