"""Run an exported model on images with onnxruntime, numpy and Pillow only: what a device installs.

This module must never import torch (directly or through cut.models / cut.tasks): a board or phone
runs `cutfl infer` with just `onnxruntime numpy pillow`. Everything torch knew comes from the sidecar
JSON written by `cut.export` next to the `.onnx` file: input size and channels, the dataset's pixel
normalisation, and per task its kind, class names and output name.

Each task's output becomes something a person can look at: a colour-coded class map (segmentation),
a colour-mapped depth map, an RGB normal map ((n + 1) / 2), or a class name with its probability.
`measure_latency` lives here too (cut.export re-exports it), so a device can time a model on itself.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SIDECAR_FORMAT = "cut-fl-onnx/1"
SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json
DEFAULT_ONNX_NAME = "model.onnx"  # what `cutfl export` writes inside a model directory

# Segmentation colours: hand-picked, distinct on screen; more classes continue with golden-ratio hues.
_BASE_PALETTE = [
    (128, 64, 128), (230, 200, 60), (70, 130, 180), (220, 20, 60), (0, 160, 90), (250, 150, 30),
    (150, 90, 200), (100, 220, 230), (190, 110, 80), (240, 120, 200), (120, 120, 120), (30, 60, 150),
]
# Depth colours: five anchors of a perceptually ordered dark-purple -> blue -> green -> yellow ramp
# (viridis-like), interpolated linearly into a 256-entry table.
_DEPTH_ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], float)


def sidecar_path(onnx_path: str | Path) -> Path:
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + SIDECAR_SUFFIX)


def resolve_onnx(model: str | Path) -> Path:
    """A `.onnx` file, or a model directory holding `model.onnx` (written by `cutfl export`)."""
    path = Path(model)
    if path.is_dir():
        candidate = path / DEFAULT_ONNX_NAME
        if not candidate.is_file():
            raise FileNotFoundError(f"{path} holds no {DEFAULT_ONNX_NAME}: run `cutfl export --model {path}` first")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file or model directory")
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: expected an .onnx file or a model directory")
    return path


def load_sidecar(onnx_path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check the sidecar of `onnx_path`; with `verify`, the ONNX file must match its sha256."""
    onnx_path = Path(onnx_path)
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_path} has no sidecar {path.name}: export it with `cutfl export`")
    try:
        sidecar = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path} is not a cut-fl ONNX sidecar (format {SIDECAR_FORMAT!r})")
    if verify and sidecar.get("onnx_sha256") and file_sha256(onnx_path) != sidecar["onnx_sha256"]:
        raise ValueError(f"{onnx_path} does not match the sha256 in {path.name}: re-export the model")
    return sidecar


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Images in


def load_image(path: str | Path):
    """A PIL image, upright (EXIF orientation applied), with one clear error for a bad file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image (PNG or JPG expected): {e}") from None


def preprocess(image, sidecar: dict[str, Any]) -> np.ndarray:
    """PIL image -> float32 1 x C x H x W exactly as the dataset normalised its training images."""
    from PIL import Image

    spec, norm = sidecar["input"], sidecar.get("normalisation")
    if not norm:
        raise ValueError("the sidecar names no pixel normalisation (the model's dataset is unknown): "
                         "re-export with `cutfl export --dataset NAME`")
    grey = norm["colour"] == "grey"
    if grey != (spec["channels"] == 1):
        raise ValueError(f"sidecar normalisation {norm['colour']!r} does not fit {spec['channels']} input channels")
    image = image.convert("L" if grey else "RGB")
    size = (int(spec["width"]), int(spec["height"]))
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)  # stretches: aspect ratio is not kept
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels[..., None] if grey else pixels
    if norm["colour"] == "bgr":
        pixels = pixels[..., ::-1]
    mean = np.asarray(norm["mean"], np.float32)
    std = np.asarray(norm["std"], np.float32)
    x = (pixels * np.float32(norm["scale"]) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Outputs out


def palette(num_classes: int) -> np.ndarray:
    """num_classes x 3 uint8 colours, the same for every run (so images compare across devices)."""
    colours = list(_BASE_PALETTE[:num_classes])
    for i in range(len(colours), num_classes):
        hue = (i * 0.618033988749895) % 1.0
        colours.append(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.95)))
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)


def depth_lut() -> np.ndarray:
    """256 x 3 uint8 colour table for depth, from the anchors in _DEPTH_ANCHORS."""
    steps = np.linspace(0, len(_DEPTH_ANCHORS) - 1, 256)
    lo = np.floor(steps).astype(int).clip(0, len(_DEPTH_ANCHORS) - 2)
    frac = (steps - lo)[:, None]
    return np.round(_DEPTH_ANCHORS[lo] * (1 - frac) + _DEPTH_ANCHORS[lo + 1] * frac).astype(np.uint8)


def colour_segmentation(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C x H x W logits -> (H x W x 3 colours, H x W class ids)."""
    classes = logits.argmax(axis=0)
    return palette(logits.shape[0])[classes], classes


def colour_depth(depth: np.ndarray) -> tuple[np.ndarray, float, float]:
    """1 x H x W depth -> (H x W x 3 colours, near, far): near is dark purple, far is yellow.

    The range is the image's 2nd..98th percentile, so a few extreme pixels do not flatten the rest.
    """
    d = depth.reshape(depth.shape[-2:]).astype(np.float64)
    finite = d[np.isfinite(d)]
    near, far = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
    span = far - near if far > near else 1.0
    index = np.nan_to_num((d - near) / span, nan=0.0).clip(0, 1) * 255
    return depth_lut()[np.round(index).astype(np.uint8)], float(near), float(far)


def colour_normals(normals: np.ndarray) -> np.ndarray:
    """3 x H x W normals -> H x W x 3 RGB via (n / |n| + 1) / 2 (x -> red, y -> green, z -> blue)."""
    n = normals.astype(np.float64)
    n = n / np.maximum(np.linalg.norm(n, axis=0, keepdims=True), 1e-6)
    return np.round((n.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def classify(logits: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """C logits -> the top class with its softmax probability."""
    z = logits.astype(np.float64).reshape(-1)
    p = np.exp(z - z.max())
    p /= p.sum()
    k = int(p.argmax())
    name = class_names[k] if k < len(class_names) else str(k)
    return {"class": name, "index": k, "probability": round(float(p[k]), 4)}


# ----------------------------------------------------------------------------------------------------
# Running


def cpu_session(model: str | Path | bytes, threads: int | None = 1, quiet: bool = False):
    """An onnxruntime CPU session of a file or serialised model; `threads` intra-op threads (None:
    onnxruntime's own choice). Sequential execution and full graph optimisation, as a device would run it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def time_runs(session, feed: dict, runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of `runs` calls of `session` on `feed`, after `warmup` untimed calls."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_latency(onnx_path: str | Path, runs: int = 50, warmup: int = 10, threads: int = 1,
                    seed: int = 0) -> dict[str, Any]:
    """ONNX Runtime CPU latency of one batch-1 forward: median and IQR in ms over `runs` after `warmup`.

    One intra-op thread by default: closest to a small device core and least disturbed by a busy host.
    """
    check_latency_args(runs, warmup, threads)
    session = cpu_session(onnx_path, threads)
    spec = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in spec.shape]
    shape[0] = 1
    feed = {spec.name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
    return latency_summary(time_runs(session, feed, runs, warmup), warmup, threads, shape)


def check_latency_args(runs: int, warmup: int, threads: int) -> None:
    if runs < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"latency needs runs >= 1, warmup >= 0, threads >= 1 (got {runs}, {warmup}, {threads})")


def latency_summary(times: list[float], warmup: int, threads: int, shape: list[int]) -> dict[str, Any]:
    """Median, IQR and min of timed runs (ms), with how they were taken; every runtime reports this shape."""
    runs = len(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if runs > 1 else (times[0],) * 3
    return {
        "median_ms": statistics.median(times),
        "iqr_ms": q3 - q1,
        "p25_ms": q1,
        "p75_ms": q3,
        "min_ms": min(times),
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "input_shape": shape,
        "times_ms": times,  # raw, so a benchmark can pool several rounds
    }


class OnnxModel:
    """An exported model and its sidecar, ready to run on images (one at a time, batch 1)."""

    def __init__(self, model: str | Path, threads: int | None = None) -> None:
        self.path = resolve_onnx(model)
        self.sidecar = load_sidecar(self.path)
        try:
            self.session = cpu_session(self.path, threads)
        except Exception as e:  # onnxruntime raises its own exception types for a corrupt file
            raise ValueError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        self.tasks = self.sidecar["tasks"]
        have = {o.name for o in self.session.get_outputs()}
        missing = [t["output"] for t in self.tasks if t["output"] not in have]
        if missing or self.session.get_inputs()[0].name != self.sidecar["input"]["name"]:
            raise ValueError(f"{self.path}: graph does not match its sidecar (outputs missing: {missing})")

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """1 x C x H x W normalised input -> task name -> output (batch dimension kept)."""
        names = [t["output"] for t in self.tasks]
        outputs = self.session.run(names, {self.sidecar["input"]["name"]: x})
        return {t["name"]: out for t, out in zip(self.tasks, outputs, strict=True)}

    def run_image(self, image_path: str | Path, out_dir: str | Path, stem: str | None = None) -> dict[str, Any]:
        """Predict one image and write one file per dense task into `out_dir`; returns what was made."""
        image = load_image(image_path)
        outputs = self.predict(preprocess(image, self.sidecar))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = stem or Path(image_path).stem
        record: dict[str, Any] = {"image": str(image_path)}
        for task in self.tasks:
            record[task["name"]] = _render(task, outputs[task["name"]][0], image.size, out_dir / f"{stem}.{task['name']}.png")
        return record


def _render(task: dict[str, Any], output: np.ndarray, size: tuple[int, int], path: Path) -> dict[str, Any]:
    """Write (dense tasks) or describe (classification) one task's output for one image."""
    from PIL import Image

    kind = task["kind"]
    if kind == "classification":
        return classify(output, task.get("class_names", []))
    if kind == "segmentation":
        rgb, classes = colour_segmentation(output)
        present = np.bincount(classes.reshape(-1), minlength=output.shape[0]) / classes.size
        names = task.get("class_names") or [str(i) for i in range(output.shape[0])]
        legend = write_legend(names, path.parent / f"legend.{task['name']}.png")  # tiny; rewritten per image
        info: dict[str, Any] = {"fractions": {names[i]: round(float(f), 4) for i, f in enumerate(present) if f > 0},
                                "legend": str(legend)}
        resample = Image.Resampling.NEAREST
    elif kind == "depth":
        rgb, near, far = colour_depth(output)
        info = {"near": round(near, 4), "far": round(far, 4), "colours": "near dark purple -> far yellow"}
        resample = Image.Resampling.BILINEAR
    elif kind == "normals":
        rgb, info, resample = colour_normals(output), {}, Image.Resampling.BILINEAR
    else:
        raise ValueError(f"task {task['name']!r}: unknown kind {kind!r} in the sidecar")
    Image.fromarray(rgb).resize(size, resample).save(path)  # back to the photo's own size
    return {"file": str(path), **info}


def write_legend(class_names: Sequence[str], path: Path, swatch: int = 14) -> Path:
    """A PNG with one row per class: its colour in the segmentation images (`palette`) and its name."""
    from PIL import Image, ImageDraw

    colours = palette(len(class_names))
    row = swatch + 6
    width = 12 + swatch + 8 * max((len(str(n)) for n in class_names), default=1) + 16
    image = Image.new("RGB", (width, 6 + row * len(class_names)), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(class_names):
        top = 6 + i * row
        draw.rectangle((6, top, 6 + swatch, top + swatch), fill=tuple(int(c) for c in colours[i]), outline="black")
        draw.text((12 + swatch, top + 1), str(name), fill="black")
    image.save(path)
    return path


def run_inference(model: str | Path, images: Sequence[str | Path], out_dir: str | Path,
                  threads: int | None = None) -> list[dict[str, Any]]:
    """Run every image; dense outputs land in `out_dir` as `<stem>.<task>.png`. Returns one record per image."""
    if not images:
        raise ValueError("no images given")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:  # before any output is written, so a typo does not leave half a run behind
        raise FileNotFoundError(f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    runner = OnnxModel(model, threads=threads)
    used: dict[str, int] = {}
    records = []
    for path in images:
        stem = Path(path).stem
        used[stem] = used.get(stem, 0) + 1
        records.append(runner.run_image(path, out_dir, stem if used[stem] == 1 else f"{stem}-{used[stem]}"))
    return records


__all__ = [
    "DEFAULT_ONNX_NAME",
    "OnnxModel",
    "SIDECAR_FORMAT",
    "classify",
    "colour_depth",
    "colour_normals",
    "colour_segmentation",
    "check_latency_args",
    "cpu_session",
    "depth_lut",
    "file_sha256",
    "load_image",
    "load_sidecar",
    "measure_latency",
    "palette",
    "write_legend",
    "preprocess",
    "latency_summary",
    "resolve_onnx",
    "run_inference",
    "sidecar_path",
    "time_runs",
]
