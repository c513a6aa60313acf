"""The embedded `scenes` dataset, checkpoints and the training loop."""

import pytest
import torch

from cut.checkpoint import NotAModelDir, load_model, save_model
from cut.data import get_dataset
from cut.data.scenes import CLASS_NAMES, Scenes
from cut.models import ModelConfig, build_model
from cut.train import evaluate, make_loader, pretrain


def test_scenes_are_deterministic_by_seed_and_differ_across_seeds_and_splits():
    a, b = Scenes("train", num_samples=3, size=32, seed=1), Scenes("train", num_samples=3, size=32, seed=1)
    x1, y1 = a[2]
    x2, y2 = b[2]
    assert torch.equal(x1, x2) and all(torch.equal(y1[k], y2[k]) for k in y1)
    x3, _ = Scenes("train", num_samples=3, size=32, seed=2)[2]
    x4, _ = Scenes("test", num_samples=3, size=32, seed=1)[2]
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)


def test_scene_targets_have_contract_shapes_and_valid_values():
    ds = get_dataset("scenes", "train", num_samples=20, size=48)
    seen = set()
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
        assert y["seg"].shape == (48, 48) and y["seg"].dtype == torch.int64
        assert y["depth"].shape == (1, 48, 48) and bool((y["depth"] > 0).all())
        norms = y["normals"].norm(dim=0)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
        seen |= set(y["seg"].unique().tolist())
        assert 0 <= ds.attribute(i) < 4
    assert seen <= set(range(len(CLASS_NAMES)))
    assert len(seen) >= 6  # the classes actually occur


def test_scene_depth_is_consistent_with_the_floor_geometry():
    # Pixels labelled floor below the horizon are nearer at the bottom of the image than higher up.
    ds = Scenes("train", num_samples=5, size=64, seed=0)
    for i in range(5):
        _, y = ds[i]
        floor = y["seg"] == 0
        rows = [r for r in range(64) if floor[r].sum() > 8]
        if len(rows) >= 2:
            top, bottom = rows[0], rows[-1]
            assert y["depth"][0, bottom][floor[bottom]].mean() < y["depth"][0, top][floor[top]].mean()


def test_checkpoint_round_trip_and_tamper_detection(tmp_path):
    ds = Scenes("train", num_samples=4, size=32)
    model = build_model(ModelConfig(tasks=ds.tasks, width=0.125, input_size=(32, 32), head_hidden=8))
    digest = save_model(tmp_path / "m", model, {"dataset": "scenes"})
    loaded, card = load_model(tmp_path / "m")
    assert card["weights_sha256"] == digest and card["dataset"] == "scenes"
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x)["seg"], loaded(x)["seg"])
    weights = tmp_path / "m" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(NotAModelDir, match="sha256"):
        load_model(tmp_path / "m")
    with pytest.raises(NotAModelDir, match="not a"):
        load_model(tmp_path / "missing")


def test_short_training_beats_initialisation():
    torch.manual_seed(0)
    train = Scenes("train", num_samples=64, size=32)
    test = Scenes("test", num_samples=32, size=32)
    model = build_model(ModelConfig(tasks=train.tasks, width=0.125, input_size=(32, 32), head_hidden=16))
    loader = make_loader(train, 16, shuffle=True)
    before = evaluate(model, make_loader(test, 16))
    result = pretrain(model, loader, make_loader(test, 16), epochs=4, lr=5e-3, progress=False)
    after = result["metrics"]
    assert after["depth"]["abs_err"] < before["depth"]["abs_err"]
    assert after["normals"]["mean_angle"] < before["normals"]["mean_angle"]
    # distillation is tested where it can fail: test_federation.py (finetune) and test_recovery.py
