"""Channel groups: stable names (across processes, full vs decomposed), classification, analytic costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cut.compact import compact_model
from cut.data.scenes import scene_tasks
from cut.groups import analyse
from cut.models import ModelConfig, build_model, count_macs, count_params
from cut.plan import PruningPlan
from cut.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(backbone: str = "resnet18", **kw) -> ModelConfig:
    base = dict(tasks=scene_tasks() + (TaskSpec("kind", "classification", num_classes=4),), backbone=backbone,
                width=0.125 if backbone != "mobilenet_v2" else 0.25, input_size=(32, 32), head_hidden=16,
                cls_hidden=16)
    base.update(kw)
    return ModelConfig(**base)


def _names_script(backbone: str) -> str:
    return (
        "import json, torch; torch.manual_seed(123)\n"
        "from tests.test_groups import tiny_config\n"
        "from cut.groups import analyse\nfrom cut.models import build_model\n"
        f"a = analyse(build_model(tiny_config({backbone!r})))\n"
        "print(json.dumps([[g.name, g.size, g.shared, list(g.tasks)] for g in a.groups]))\n"
    )


def test_group_names_are_stable_across_processes():
    backbones = ("resnet18", "mobilenet_v2")
    script = "\n".join(_names_script(b) for b in backbones)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    theirs = [json.loads(line) for line in out.stdout.strip().splitlines()]
    for backbone, other in zip(backbones, theirs, strict=True):
        torch.manual_seed(7)  # different weights: names must not depend on them
        mine = [[g.name, g.size, g.shared, list(g.tasks)] for g in analyse(build_model(tiny_config(backbone))).groups]
        assert mine == other


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_decomposed_groups_keep_the_full_models_names(backbone):
    full = build_model(tiny_config(backbone))
    sub = full.decompose(["depth", "kind"])
    fa, sa = analyse(full), analyse(sub)
    full_groups, sub_groups = fa.by_name(), sa.by_name()
    assert set(sub_groups) <= set(full_groups)
    for name, g in sub_groups.items():
        assert g.size == full_groups[name].size
        assert g.shared == full_groups[name].shared
    # exactly the unselected heads' groups are gone
    gone = set(full_groups) - set(sub_groups)
    assert gone and all(n.startswith(("heads.seg.", "heads.normals.")) for n in gone)


def test_groups_are_classified_shared_or_task_specific():
    a = analyse(build_model(tiny_config()))
    for g in a.groups:
        if g.name.startswith("backbone."):
            assert g.shared
        else:
            task = g.name.split(".")[1]
            assert not g.shared and g.tasks == (task,)
    last = a.by_name()["backbone.layer4.0.conv2"]  # feeds every head
    assert last.tasks == ("seg", "depth", "normals", "kind")
    # the heads' final classifiers never root a group
    assert not any(n.endswith(".3") or n.endswith("fc2") for n in a.names)
    assert a.by_name()["heads.seg.branches.0.0"].size == 16


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "mobilenet_v2"])
def test_analytic_cost_equals_real_counts_after_compaction(backbone):
    model = build_model(tiny_config(backbone)).decompose(["seg", "kind"])
    a = analyse(model)
    assert a.cost.dense_params == count_params(model)
    assert a.cost.dense_macs == count_macs(model)
    rng = np.random.default_rng(0)
    for _ in range(2):
        keep = {g.name: tuple(sorted(rng.choice(g.size, int(rng.integers(1, g.size + 1)), replace=False).tolist()))
                for g in a.groups}
        plan = PruningPlan("x" * 64, tuple(model.task_names), keep, a.sizes)
        compact = compact_model(model, plan)
        counts = {g: len(v) for g, v in keep.items()}
        assert a.cost.params(counts) == count_params(compact)
        assert a.cost.macs(counts) == count_macs(compact)


def test_analysis_is_cached_per_config_and_shapes():
    model = build_model(tiny_config())
    assert analyse(model) is analyse(build_model(tiny_config()))
    a = analyse(model)
    keep = {g.name: tuple(range(max(1, g.size // 2))) for g in a.groups}
    compact = compact_model(model, PruningPlan("x" * 64, tuple(model.task_names), keep, a.sizes))
    b = analyse(compact)  # same config, other shapes: its own analysis with the same names
    assert b is not a and b.names == a.names
    assert b.sizes == {g: len(v) for g, v in keep.items()}
