"""ONNX export, parity with torch, the sidecar, and torch-free inference (cut.export, cut.infer, cutfl export/infer)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from cut.checkpoint import save_model
from cut.data.scenes import scene_tasks
from cut.export import NORMALISATION, PARITY_TOLERANCE, MatmulResize, check_parity, export_onnx, measure_latency
from cut.infer import load_sidecar, preprocess, sidecar_path
from cut.models import ModelConfig, build_model
from cut.tasks import TaskSpec

ENV = {**os.environ, "CUTFL_NO_PROGRESS": "1"}
# What a device-only install (onnxruntime numpy pillow) lacks; `cutfl infer` must not need any of it.
NOT_ON_DEVICE = ("torch", "torchvision", "torch_pruning", "flwr", "onnx", "matplotlib", "rich", "grpc")
FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cutfl", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def scenes_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(32, 32), head_hidden=16)).eval()


def fashion_model():
    torch.manual_seed(1)
    tasks = (
        TaskSpec("left", "classification", num_classes=10, class_names=FASHION),
        TaskSpec("layout", "segmentation", num_classes=3, class_names=("background", "left", "right")),
    )
    return build_model(ModelConfig(tasks=tasks, width=0.125, in_channels=1, input_size=(36, 36), head_hidden=16,
                                   cls_hidden=16)).eval()


def write_png(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    """A saved tiny scenes model, exported once through the CLI (the other tests reuse the files)."""
    directory = tmp_path_factory.mktemp("scenes") / "model"
    save_model(directory, scenes_model(), {"dataset": "scenes"})
    proc = run_cli("export", "--model", str(directory), "--latency-runs", "20", "--warmup", "2")
    assert proc.returncode == 0, proc.stderr
    return directory, json.loads(proc.stdout)


def _graph_contract(path, names):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    assert opset >= 17
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == names
    return proto


def test_scenes_export_contract_and_parity(tmp_path):
    model = scenes_model()
    model.train()  # the exporter must not run the caller's model in train mode (BN statistics would move)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "m.onnx"
    sidecar = export_onnx(model, path, dataset="scenes")
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    _graph_contract(path, ["seg", "depth", "normals"])
    diff = check_parity(model, path, n=4, seed=0)
    assert diff <= PARITY_TOLERANCE
    # dynamic batch: a batch of 3 in one call gives the same outputs as torch
    x = torch.randn(3, 3, 32, 32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)
    for name, out in zip(["seg", "depth", "normals"], got, strict=True):
        assert out.shape == tuple(want[name].shape)
        assert np.abs(out - want[name].numpy()).max() <= PARITY_TOLERANCE
    assert load_sidecar(path) == sidecar == json.loads(sidecar_path(path).read_text())
    assert sidecar["input"] == {"name": "image", "dtype": "float32", "layout": "NCHW", "batch": "dynamic",
                                "channels": 3, "height": 32, "width": 32}
    assert sidecar["outputs"] == ["seg", "depth", "normals"]
    seg = sidecar["tasks"][0]
    assert (seg["kind"], seg["num_classes"], seg["class_names"][0]) == ("segmentation", 8, "floor")
    assert sidecar["normalisation"]["mean"] == [0.45] * 3 and sidecar["normalisation"]["colour"] == "rgb"


@pytest.mark.parametrize("in_hw,out_hw", [((8, 8), (64, 64)), ((5, 7), (36, 50)), ((16, 12), (8, 6)), ((4, 4), (4, 4))])
def test_matmul_resize_is_bilinear_interpolation(in_hw, out_hw):
    y = torch.randn(2, 3, *in_hw)
    expected = torch.nn.functional.interpolate(y, size=out_hw, mode="bilinear", align_corners=False)
    assert torch.allclose(MatmulResize(in_hw, out_hw)(y), expected, atol=1e-5)


def test_exported_graph_resizes_by_matmul_with_no_shape_arithmetic(tmp_path):
    # A Resize node fed by Shape/Gather/Concat cost the default model about a tenth of its time on onnxruntime.
    model = scenes_model().decompose(["seg", "depth"])
    path = tmp_path / "m.onnx"
    export_onnx(model, path, batch=2)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMul" in ops and not ops & {"Resize", "Shape", "Gather", "Concat"}
    assert check_parity(model, path, n=4) < PARITY_TOLERANCE
    images = torch.randn(3, 3, 32, 32)  # a batch the export's example did not have, through the dynamic axis
    with torch.no_grad():
        expected = model.eval()(images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["seg", "depth"], {"image": images.numpy()})
    for name, out in zip(["seg", "depth"], got, strict=True):
        assert out.shape == tuple(expected[name].shape)
        assert np.abs(out - expected[name].numpy()).max() < PARITY_TOLERANCE


def _random_batchnorm(model):
    """BatchNorm statistics and affine terms away from their initial values, so folding them is exercised."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _pruned(model):
    """`model` with every channel group cut to its own width (1/4 to 3/4 of it, multiples of 4): head branches
    of different widths."""
    from cut.compact import compact_model
    from cut.groups import analyse
    from cut.planner import plan_from_counts

    analysis = analyse(model)
    counts = {g.name: max(4, g.size * (1 + i % 3) // 16 * 4) for i, g in enumerate(analysis.groups)}
    plan = plan_from_counts({g.name: np.zeros(g.size) for g in analysis.groups}, counts, analysis, "params", 1.0,
                            tasks=tuple(model.task_names))
    return compact_model(model, plan).eval()


@pytest.mark.parametrize("tasks", [("seg", "depth", "normals"), ("seg", "depth"), ("normals",),
                                   ("seg", "kind", "depth")])
def test_the_export_runs_every_dense_head_as_one_fused_computation_with_the_same_outputs(tmp_path, tasks):
    """Branches of every dense head with the same conv settings run as one conv (BN folded), their classifiers
    as one 1x1 conv per fused conv, every dense output resized at once: fewer, wider convs, the same outputs,
    for dense and pruned models (whose branches have different widths); a classification head runs as it is."""
    from cut.export import FusedDenseHeads, _TupleOutputs

    torch.manual_seed(0)
    config = ModelConfig(tasks=scene_tasks() + (TaskSpec("kind", "classification", num_classes=4),), width=0.125,
                         input_size=(32, 32), head_hidden=16)
    full = _random_batchnorm(build_model(config))
    for model in (full.decompose(list(tasks)).eval(), _pruned(full.decompose(list(tasks)).eval())):
        dense = [t for t in tasks if t != "kind"]
        x = torch.randn(2, 3, 32, 32)
        wrapper = _TupleOutputs(model, x[:1]).eval()
        assert isinstance(wrapper.fused, FusedDenseHeads) and wrapper.fused.names == dense
        assert len(wrapper.fused.convs) == len(config.head_dilations)  # one conv per dilation, whatever the tasks
        widths = {b[0].out_channels for t in dense for b in model.heads[t].branches}
        assert [c.out_channels for c in wrapper.fused.convs] == [
            sum(model.heads[t].branches[i][0].out_channels for t in dense) for i in range(len(config.head_dilations))]
        with torch.no_grad():
            want, got = model(x), wrapper(x)
        for name, out in zip(model.task_names, got, strict=True):
            assert out.shape == want[name].shape and torch.allclose(out, want[name], atol=1e-5), name
        path = tmp_path / "m.onnx"
        export_onnx(model, path)
        assert check_parity(model, path, n=3) <= PARITY_TOLERANCE
        convs = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
        backbone = sum(isinstance(m, torch.nn.Conv2d) for m in model.backbone.modules())
        assert convs == backbone + 2 * len(config.head_dilations)  # not 2 per branch of every head
    assert len(widths) > 1 or len(dense) == 1  # the pruned model's branches differ in width


def test_a_custom_head_is_exported_unfused(tmp_path):
    """Heads that are not sums of conv -> BN -> ReLU -> 1x1 branches run as the model defines them."""
    from cut.export import FusedDenseHeads, _TupleOutputs

    model = scenes_model().decompose(["seg", "depth"])
    model.heads["depth"].branches[0][2] = torch.nn.Sigmoid()
    wrapper = _TupleOutputs(model, torch.zeros(1, 3, 32, 32))
    assert wrapper.fused is None and not FusedDenseHeads.fusable(dict(model.heads))
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    assert check_parity(model, path, n=2) <= PARITY_TOLERANCE


def test_grey_classification_export(tmp_path):
    model = fashion_model()
    path = tmp_path / "fashion.onnx"
    sidecar = export_onnx(model, path, dataset="multifashion", dynamic_batch=False)
    proto = _graph_contract(path, ["left", "layout"])
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 1, 36, 36]
    assert check_parity(model, path, n=3) <= PARITY_TOLERANCE
    left = sidecar["tasks"][0]
    assert (left["kind"], left["num_classes"], left["shape"]) == ("classification", 10, [1, 10])
    assert left["class_names"] == list(FASHION)
    assert sidecar["normalisation"]["colour"] == "grey" and sidecar["input"]["channels"] == 1
    batch2 = tmp_path / "fashion-b2.onnx"
    export_onnx(model, batch2, dataset="multifashion", batch=2, dynamic_batch=False)
    assert check_parity(model, batch2, n=2) <= PARITY_TOLERANCE  # parity feeds the batch the graph fixes


def test_latency_reports_median_and_iqr(tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(scenes_model(), path, dataset="scenes")
    result = measure_latency(path, runs=20, warmup=2)
    assert result["runs"] == 20 and result["threads"] == 1 and result["input_shape"] == [1, 3, 32, 32]
    assert 0 < result["min_ms"] <= result["median_ms"] and result["iqr_ms"] >= 0


def test_normalisation_table_matches_the_datasets():
    from cut.data import multifashion, nyuv2, scenes

    assert NORMALISATION["scenes"]["mean"] == [scenes._MEAN] * 3 and NORMALISATION["scenes"]["std"] == [scenes._STD] * 3
    assert NORMALISATION["multifashion"]["mean"] == [multifashion.PIXEL_MEAN]
    assert NORMALISATION["multifashion"]["std"] == [multifashion.PIXEL_STD]
    np.testing.assert_allclose(NORMALISATION["nyuv2"]["mean"], nyuv2.BGR_MEAN, rtol=1e-6)
    assert NORMALISATION["nyuv2"]["std"] == [nyuv2.IMAGE_STD] * 3


def test_preprocess_reproduces_the_scenes_input(tmp_path):
    """A scene saved as an 8-bit PNG and preprocessed by cut.infer gives the dataset's own tensor."""
    from cut.data.scenes import Scenes

    dataset = Scenes("test", num_samples=1, size=32)
    x, _ = dataset[0]
    pixels = np.round((x.numpy().transpose(1, 2, 0) * 0.25 + 0.45) * 255).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    sidecar = {"input": {"channels": 3, "height": 32, "width": 32}, "normalisation": NORMALISATION["scenes"]}
    got = preprocess(Image.open(tmp_path / "scene.png"), sidecar)
    assert got.shape == (1, 3, 32, 32) and got.dtype == np.float32
    assert np.abs(got[0] - x.numpy()).max() <= 0.5 / 255 / 0.25 + 1e-3  # 8-bit rounding only


def test_cli_export_then_infer_writes_one_file_per_task(scenes_dir, tmp_path):
    directory, report = scenes_dir
    assert report["parity_max_abs_diff"] <= PARITY_TOLERANCE and report["exporter"] == "torchscript"
    assert report["bytes"] == (directory / "model.onnx").stat().st_size
    assert report["latency_ms"]["runs"] == 20 and report["latency_ms"]["median_ms"] > 0
    a = write_png(tmp_path / "a.png", (48, 40))
    b = write_png(tmp_path / "b.png", (20, 30), mode="L", seed=1)  # grey input is converted to RGB
    out = tmp_path / "out"
    proc = run_cli("infer", "--model", str(directory), str(a), str(b), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(a), str(b)]
    for stem, size in (("a", (48, 40)), ("b", (20, 30))):
        for task in ("seg", "depth", "normals"):
            with Image.open(out / f"{stem}.{task}.png") as im:
                assert im.mode == "RGB" and im.size == size
    assert len(json.loads((out / "predictions.json").read_text())) == 2
    assert set(lines[0]["seg"]["fractions"]) <= set(scene_tasks()[0].class_names)


def test_cli_infer_classification_prints_class_and_probability(tmp_path):
    directory = tmp_path / "fashion"
    save_model(directory, fashion_model(), {"dataset": "multifashion"})
    assert run_cli("export", "--model", str(directory), "--latency-runs", "0").returncode == 0
    image = write_png(tmp_path / "item.png", (36, 36), seed=3)
    proc = run_cli("infer", "--model", str(directory / "model.onnx"), str(image), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["left"]["class"] in FASHION and 0.1 <= record["left"]["probability"] <= 1
    assert (tmp_path / "o" / "item.layout.png").is_file()
    assert not (tmp_path / "o" / "item.left.png").exists()


def test_infer_module_never_imports_torch(scenes_dir, tmp_path):
    directory, _ = scenes_dir
    image = write_png(tmp_path / "x.png", (32, 32))
    script = textwrap.dedent(f"""
        import sys
        import cut.infer
        records = cut.infer.run_inference({str(directory)!r}, [{str(image)!r}], {str(tmp_path / "out")!r})
        assert records[0]["seg"]["file"].endswith("x.seg.png"), records
        assert cut.infer.measure_latency({str(directory / "model.onnx")!r}, runs=20, warmup=1)["median_ms"] > 0
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_cutfl_infer_runs_with_torch_unavailable(scenes_dir, tmp_path):
    """`cutfl infer` (cutfl.cli and every command module it registers) needs only onnxruntime, numpy, Pillow."""
    directory, _ = scenes_dir
    image = write_png(tmp_path / "x.png", (32, 32))
    script = textwrap.dedent(f"""
        import sys

        ABSENT = {NOT_ON_DEVICE!r}

        class DeviceOnly:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ABSENT:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)

        sys.meta_path.insert(0, DeviceOnly())
        from cutfl.cli import main
        sys.exit(main(["infer", "--model", {str(directory)!r}, {str(image)!r}, "--out", {str(tmp_path / "o")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "x.normals.png").is_file()


def test_bad_input_is_one_line(scenes_dir, tmp_path):
    directory, _ = scenes_dir
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    bare = tmp_path / "bare"
    save_model(bare, scenes_model(), {"dataset": "scenes"})
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes((directory / "model.onnx").read_bytes() + b"\0")
    sidecar_path(tampered).write_text((directory / "model.onnx.json").read_text())
    image = str(write_png(tmp_path / "ok.png", (8, 8)))
    unknown_data = tmp_path / "unknown-data.onnx"
    assert export_onnx(scenes_model(), unknown_data)["normalisation"] is None  # no dataset: infer must refuse
    cases = [
        (["infer", "--model", str(tmp_path / "nope.onnx"), image], "no such onnx file"),
        (["infer", "--model", str(directory), str(tmp_path / "missing.png")], "no such image"),
        (["infer", "--model", str(directory), str(not_image)], "not a readable image"),
        (["infer", "--model", str(bare), image], "run `cutfl export"),
        (["infer", "--model", str(tampered), image], "does not match the sha256"),
        (["infer", "--model", str(unknown_data), image], "names no pixel normalisation"),
        (["export", "--model", str(bare), "--dataset", "nope"], "no pixel normalisation known for dataset 'nope'"),
        (["export", "--model", str(bare), "--format", "tflite"], "unknown export format"),
        (["export", "--model", str(tmp_path / "absent")], "not a directory holding a cut-fl model"),
        (["export", "--model", str(bare), "--opset", "13"], "must be >= 17"),
        (["export", "--model", str(bare), "--latency-runs", "5"], "at least 20"),
    ]
    for args, fragment in cases:
        proc = run_cli(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert fragment.lower() in lines[0].lower(), (args, lines[0])


@pytest.mark.skipif(importlib.util.find_spec("cut.compact") is None or importlib.util.find_spec("cut.budget") is None,
                    reason="cut.compact / cut.budget not in this checkout yet: no compact model to export")
def test_compact_model_exports_with_its_plan(tmp_path):
    from cut.budget import make_plan
    from cut.checkpoint import load_model
    from cut.compact import compact_model
    from cut.fusion import fuse
    from cut.groups import analyse
    from cut.importance import score_tasks

    dense = scenes_model()
    plan = make_plan(fuse(score_tasks(dense, None, dense.task_names, "magnitude")), analyse(dense), "params", 0.5,
                     tasks=dense.task_names)
    directory = tmp_path / "compact"
    save_model(directory, compact_model(dense, plan), {"dataset": "scenes", "plan": plan.to_dict()})
    proc = run_cli("export", "--model", str(directory), "--latency-runs", "0")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["parity_max_abs_diff"] <= PARITY_TOLERANCE
    model, _ = load_model(directory)
    _graph_contract(directory / "model.onnx", ["seg", "depth", "normals"])
    sidecar = load_sidecar(directory / "model.onnx")
    assert sidecar["model"]["plan_hash"] == plan.plan_hash
    assert sidecar["model"]["budget"] == {"kind": "params", "value": 0.5}
    assert report["params"] == sum(p.numel() for p in model.parameters()) < 0.55 * sum(
        p.numel() for p in dense.parameters())
    dense_path = tmp_path / "dense.onnx"
    export_onnx(dense, dense_path, dataset="scenes")
    assert report["bytes"] < 0.6 * dense_path.stat().st_size
