"""ExecuTorch export (cut.export_executorch, `cutfl export --format executorch`).

`executorch` is an optional package that CI does not install (pyproject's `executorch` extra is not in
`dev`): without it the command must stop with one line naming the package; the export itself is tested
only where it is installed (a plain `pytest.importorskip`, not conftest's `skip_unless_installed`, which
fails in CI for the resources scripts/setup.sh installs).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cut.checkpoint import save_model
from cut.data.scenes import scene_tasks
from cut.models import ModelConfig, build_model

ENV = {**os.environ, "CUTFL_NO_PROGRESS": "1"}
HAVE_EXECUTORCH = importlib.util.find_spec("executorch") is not None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cutfl", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def scenes_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16)).eval()


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_cli_without_executorch_is_one_line(tmp_path):
    directory = tmp_path / "model"
    save_model(directory, scenes_model(), {"dataset": "scenes"})
    # executorch made unimportable (sys.modules[name] = None is what an absent package looks like to
    # importlib.util.find_spec and to `import`), so this holds in a venv that has it too
    script = textwrap.dedent(f"""
        import sys
        sys.modules["executorch"] = None
        from cutfl.cli import main
        sys.exit(main(["export", "--model", {str(directory)!r}, "--format", "executorch"]))
    """)
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)]
    if not HAVE_EXECUTORCH:  # and the plain command, as a user without it runs it
        runs.append(run_cli("export", "--model", str(directory), "--format", "executorch"))
    for proc in runs:
        line = _one_line(proc)
        assert "executorch" in line and "pip install executorch" in line, line
    assert not (directory / "model.pte").exists()


def test_library_without_executorch_raises_executorch_unavailable(tmp_path, monkeypatch):
    from cut.export_executorch import ExecutorchUnavailable, check_parity, export_executorch

    monkeypatch.setitem(sys.modules, "executorch", None)
    model = scenes_model()
    with pytest.raises(ExecutorchUnavailable, match="needs the `executorch` package.*pip install executorch"):
        export_executorch(model, tmp_path / "m.pte", dataset="scenes")
    with pytest.raises(ExecutorchUnavailable):
        check_parity(model, tmp_path / "m.pte")
    with pytest.raises(ValueError, match="must end in .pte"):  # argument checks come first, with or without it
        export_executorch(model, tmp_path / "m.onnx")


def test_compact_model_exports_runs_and_matches_torch(tmp_path):
    pytest.importorskip("executorch", reason="optional: pip install executorch (pyproject's `executorch` extra)")
    from executorch.runtime import Runtime

    from cut.budget import make_plan
    from cut.checkpoint import load_model
    from cut.compact import compact_model
    from cut.export import PARITY_TOLERANCE
    from cut.fusion import fuse
    from cut.groups import analyse
    from cut.importance import score_tasks
    from cut.infer import file_sha256, sidecar_path

    dense = scenes_model()
    plan = make_plan(fuse(score_tasks(dense, None, dense.task_names, "magnitude")), analyse(dense), "params", 0.5,
                     tasks=dense.task_names)
    directory = tmp_path / "compact"
    save_model(directory, compact_model(dense, plan), {"dataset": "scenes", "plan": plan.to_dict()})
    proc = run_cli("export", "--model", str(directory), "--format", "executorch", "--latency-runs", "20",
                   "--warmup", "2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    pte = directory / "model.pte"
    assert report["pte"] == str(pte) and report["backend"] == "XnnpackBackend"
    assert report["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert report["delegation"]["delegated_nodes"] > 0 and report["delegation"]["subgraphs"] >= 1
    assert report["latency_ms"]["runs"] == 20 and report["latency_ms"]["median_ms"] > 0
    sidecar = json.loads(sidecar_path(pte).read_text())
    assert sidecar["format"] == "cut-fl-executorch/1" and sidecar["pte_file"] == "model.pte"
    assert sidecar["pte_sha256"] == file_sha256(pte) and sidecar["pte_bytes"] == pte.stat().st_size
    assert sidecar["input"] == {"name": "image", "dtype": "float32", "layout": "NCHW", "batch": 1,
                                "channels": 3, "height": 32, "width": 32}
    assert sidecar["outputs"] == ["seg", "depth", "normals"] and sidecar["normalisation"]["colour"] == "rgb"
    assert sidecar["model"]["plan_hash"] == plan.plan_hash
    assert sidecar["model"]["budget"] == {"kind": "params", "value": 0.5}
    assert "onnx_file" not in sidecar and "opset" not in sidecar

    # the file loads and runs in ExecuTorch's own runtime, independently of cut's helpers
    model, _ = load_model(directory)
    method = Runtime.get().load_program(pte).load_method("forward")
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    outputs = method.execute([image])
    with torch.no_grad():
        want = model(image)
    assert len(outputs) == 3
    for name, got in zip(["seg", "depth", "normals"], outputs, strict=True):
        assert tuple(got.shape) == tuple(want[name].shape)
        assert (got - want[name]).abs().max().item() <= PARITY_TOLERANCE


def test_export_executorch_leaves_the_model_alone_and_checks_tolerance(tmp_path):
    pytest.importorskip("executorch", reason="optional: pip install executorch (pyproject's `executorch` extra)")
    from cut.export_executorch import check_parity, export_executorch, measure_latency

    model = scenes_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "m.pte"
    sidecar = export_executorch(model, path)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sidecar["normalisation"] is None  # no dataset named: like the ONNX export, none guessed
    model.eval()
    diff = check_parity(model, path, n=2)
    assert 0 <= diff <= 1e-4
    with pytest.raises(ValueError, match="exceeds the tolerance"):
        check_parity(model, path, n=1, tol=1e-30 if diff > 0 else -1.0)
    latency = measure_latency(path, runs=20, warmup=1)
    assert latency["input_shape"] == [1, 3, 32, 32] and latency["pool_threads"] in (1, None)
    assert 0 < latency["min_ms"] <= latency["median_ms"]
