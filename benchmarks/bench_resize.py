"""The exported graph's bilinear resize: onnxruntime's Resize node vs cut.export.MatmulResize, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_resize.py [--model runs/pretrained-scenes] [--tasks seg,depth]

Part 1: one resize alone (C channels from H/8 x W/8 to H x W), both graphs timed in interleaved rounds
(`cut.latency.interleaved_ms`), batch 1, 1 thread. Part 2: the decomposed default model exported as before
(the model's own forward: F.interpolate traced with `size=x.shape[-2:]`, a Resize fed by Shape arithmetic)
and as `cut.export.export_onnx` writes it now, timed interleaved (`cut.latency.interleaved_ms`).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/pretrained-scenes"))
    p.add_argument("--tasks", default="seg,depth")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    start = time.perf_counter()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from cut.checkpoint import load_model
    from cut.export import INPUT_NAME, MatmulResize, _export, _TupleOutputs, export_onnx
    from cut.infer import cpu_session
    from cut.latency import interleaved_ms

    torch.set_num_threads(1)

    class Interpolate(torch.nn.Module):
        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, y):
            return F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)

    print("| output | channels | Resize us | MatmulResize us | ratio |\n|---|---|---|---|---|")
    for size, channels in ((64, 8), (128, 8), (256, 8), (256, 19), (512, 19)):
        y = torch.randn(1, channels, size // 8, size // 8)
        graphs = []
        for module in (Interpolate((size, size)), MatmulResize((size // 8, size // 8), (size, size))):
            buffer = io.BytesIO()
            torch.onnx.export(module.eval(), (y,), buffer, input_names=["y"], output_names=["out"], opset_version=17,
                              dynamo=False)
            graphs.append(buffer.getvalue())
        a, b = (ms * 1e3 for ms in interleaved_ms(graphs, 1, rounds=args.rounds, runs=10))
        print(f"| {size}x{size} | {channels} | {a:.1f} | {b:.1f} | {a / b:.1f}x |")

    base, _ = load_model(args.model)
    model = base.decompose(args.tasks.split(",")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        before, now = Path(tmp) / "before.onnx", Path(tmp) / "now.onnx"
        example = torch.zeros(1, model.config.in_channels, *model.config.input_size)
        names = list(model.task_names)
        _export(_TupleOutputs(model).eval(), example, before, 17, names,
                {n: {0: "batch"} for n in [INPUT_NAME, *names]})
        export_onnx(model, now)
        ms = interleaved_ms([before, now], 1, rounds=args.rounds, runs=10)
        outputs = [cpu_session(path, 1, quiet=True).run(None, {INPUT_NAME: np.ones(example.shape, np.float32)})
                   for path in (before, now)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*outputs, strict=True))
    print(f"\n{args.model} ({args.tasks}), {model.config.input_size[0]}x{model.config.input_size[1]}: "
          f"before {ms[0]:.3f} ms, now {ms[1]:.3f} ms ({ms[1] / ms[0]:.3f}x), max output difference {diff:.1e} "
          f"({time.perf_counter() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
