"""Metrics against values computed by hand on small arrays."""

import math

import pytest
import torch

from cut.metrics import ClassificationMetric, DepthMetric, NormalsMetric, SegmentationMetric, delta_m, mean_std


def test_segmentation_miou_counts_present_classes_and_skips_ignore():
    # 3 classes; class 2 never occurs in the ground truth -> excluded from the mean.
    target = torch.tensor([[0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2, 0]])
    m = SegmentationMetric(num_classes=3, ignore_index=255)
    m.update(pred, target)
    out = m.compute()
    # class 0: inter 1, union = 2 (true) + 1 (pred) - 1 = 2 -> 0.5 ; class 1: inter 1, union 2 + 2 - 1 = 3 -> 1/3
    assert out["miou"] == pytest.approx((0.5 + 1 / 3) / 2 * 100)
    assert out["pixel_acc"] == pytest.approx(2 / 4 * 100)


def test_segmentation_class_present_but_never_predicted_counts_as_zero():
    target = torch.tensor([[0, 1]])
    pred = torch.tensor([[0, 0]])
    m = SegmentationMetric(2)
    m.update(pred, target)
    # class 0 IoU = 1/2, class 1 IoU = 0 (present, never predicted: kept, unlike DiSparse's code)
    assert m.compute()["miou"] == pytest.approx(25.0)


def test_segmentation_accepts_logits_and_accumulates_batches():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 1] = 5.0  # predicts [0, 1]
    m = SegmentationMetric(2)
    m.update(logits, torch.tensor([[[0, 1]]]))
    m.update(torch.tensor([[[1, 1]]]), torch.tensor([[[0, 1]]]))
    # confusion: class0 -> (0:1, 1:1), class1 -> (1:2); IoU0 = 1/2, IoU1 = 2/3
    assert m.compute()["miou"] == pytest.approx((0.5 + 2 / 3) / 2 * 100)


def test_depth_metrics_mask_invalid_pixels():
    target = torch.tensor([[[[1.0, 2.0, float("nan"), 0.0]]]])
    pred = torch.tensor([[[[1.5, 2.0, 100.0, 100.0]]]])
    m = DepthMetric()
    m.update(pred, target)
    out = m.compute()
    assert out["abs_err"] == pytest.approx(0.25)
    assert out["rel_err"] == pytest.approx((0.5 / 1 + 0) / 2)
    assert out["delta1"] == pytest.approx(50.0)  # 1.5/1 = 1.5 fails, 2/2 passes


def test_normals_angles_in_degrees_with_invalid_pixels_masked():
    target = torch.zeros(1, 3, 1, 3)
    target[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    target[0, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])
    # pixel 2 has a zero normal: invalid
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, 2.0])  # 0 degrees (scale ignored)
    pred[0, :, 0, 1] = torch.tensor([1.0, 0.0, 1.0])  # 45 degrees
    pred[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])
    m = NormalsMetric()
    m.update(pred, target)
    out = m.compute()
    assert out["mean_angle"] == pytest.approx(22.5, abs=1e-4)
    assert out["within_11.25"] == pytest.approx(50.0)
    assert out["within_30"] == pytest.approx(50.0)
    assert out["median_angle"] == pytest.approx(0.0, abs=0.01)


def test_classification_top1():
    m = ClassificationMetric()
    m.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
    assert m.compute()["top1"] == pytest.approx(200 / 3)


def test_delta_m_signs_follow_direction():
    dense = {"seg": 40.0, "depth": 0.5}
    compact = {"seg": 38.0, "depth": 0.45}
    # seg: -5%, depth lower is better: -(0.45-0.5)/0.5 = +10% -> mean +2.5
    assert delta_m(compact, dense, {"seg": True, "depth": False}) == pytest.approx(2.5)
    assert delta_m(dense, dense, {"seg": True, "depth": False}) == 0.0


def test_delta_m_rejects_missing_and_zero_baselines():
    with pytest.raises(ValueError, match="seg"):
        delta_m({}, {"seg": 1.0}, {"seg": True})
    with pytest.raises(ValueError, match="dense metric"):
        delta_m({"seg": 1.0}, {"seg": 0.0}, {"seg": True})


def test_mean_std():
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
