"""Metrics against confusion matrices computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.metrics import ConfusionMatrix, SegmentationMetrics, batch_confusion, per_image_table

NAMES = ["background", "a", "b", "c"]

# 8 pixels; class c (3) appears in neither truth nor prediction.
TARGET = np.array([0, 0, 0, 0, 1, 1, 1, 2])
PRED = np.array([0, 0, 1, 0, 1, 1, 2, 2])


def test_confusion_matrix_counts_true_by_predicted():
    cm = ConfusionMatrix(4).update(PRED, TARGET)
    expected = np.array([
        [3, 1, 0, 0],
        [0, 2, 1, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(cm.matrix, expected)


def test_metrics_by_hand_with_a_class_absent_everywhere():
    m = SegmentationMetrics.from_confusion(ConfusionMatrix(4).update(PRED, TARGET), NAMES)
    # background: tp 3, union 4 + 3 - 3 = 4; a: tp 2, union 3 + 3 - 2 = 4; b: tp 1, union 1 + 2 - 1 = 2
    assert m.per_class_iou["background"] == pytest.approx(75.0)
    assert m.per_class_iou["a"] == pytest.approx(50.0)
    assert m.per_class_iou["b"] == pytest.approx(50.0)
    # c is in neither truth nor prediction: undefined, reported None, left out of the means
    assert m.per_class_iou["c"] is None
    assert m.per_class_dice["c"] is None
    assert m.undefined_classes == ["c"]
    assert m.defect_miou == pytest.approx(50.0)
    assert m.background_iou == pytest.approx(75.0)
    # Dice a: 2*2/(3+3); b: 2*1/(1+2)
    assert m.per_class_dice["a"] == pytest.approx(200 / 3)
    assert m.dice == pytest.approx(200 / 3)
    assert m.pixel_accuracy == pytest.approx(75.0)
    assert m.pixels == 8


def test_a_class_only_predicted_counts_as_zero():
    pred = PRED.copy()
    pred[0] = 3  # a false positive of c, which is absent from the truth
    m = SegmentationMetrics.from_confusion(ConfusionMatrix(4).update(pred, TARGET), NAMES)
    assert m.per_class_iou["c"] == 0.0
    assert m.defect_miou == pytest.approx((50.0 + 50.0 + 0.0) / 3)
    assert m.per_class_iou["background"] == pytest.approx(2 / 4 * 100)  # tp 2, truth 4, pred 2


def test_no_defect_defined_gives_none():
    target = np.zeros(10, int)
    m = SegmentationMetrics.from_confusion(ConfusionMatrix(3).update(target, target), ["bg", "x", "y"])
    assert m.defect_miou is None and m.dice is None
    assert m.background_iou == 100.0
    assert m.pixel_accuracy == 100.0


def test_accumulation_over_batches_equals_one_update_and_ignores_out_of_range():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(5, 6, 7))
    pred = rng.integers(0, 4, size=(5, 6, 7))
    whole = ConfusionMatrix(4).update(torch.from_numpy(pred), torch.from_numpy(target))
    parts = ConfusionMatrix(4)
    for i in range(5):
        parts.update(pred[i], target[i])
    np.testing.assert_array_equal(whole.matrix, parts.matrix)
    ignored = target.copy()
    ignored[0] = 255
    with_ignore = ConfusionMatrix(4).update(pred, ignored)
    assert with_ignore.matrix.sum() == target.size - target[0].size
    np.testing.assert_array_equal(batch_confusion(pred, target, 4).sum(axis=0), whole.matrix)


def test_per_image_table():
    target = np.array([[[0, 1], [1, 0]], [[0, 0], [2, 2]]])
    pred = np.array([[[0, 1], [0, 0]], [[0, 0], [2, 2]]])
    table = per_image_table(batch_confusion(pred, target, 3), ["bg", "x", "y"], ["i0.png", "i1.png"])
    assert list(table["image"]) == ["i0.png", "i1.png"]
    # image 0: x tp 1, union 2 -> 50; y absent from both -> NaN; defect mIoU over x only
    assert table.loc[0, "iou x"] == pytest.approx(50.0)
    assert math.isnan(table.loc[0, "iou y"])
    assert table.loc[0, "defect_miou"] == pytest.approx(50.0)
    assert table.loc[0, "pixel_accuracy"] == pytest.approx(75.0)
    assert bool(table.loc[0, "present x"]) and not bool(table.loc[0, "present y"])
    # image 1: perfect on y, x absent from both
    assert table.loc[1, "defect_miou"] == pytest.approx(100.0)
    assert math.isnan(table.loc[1, "iou x"])
    assert bool(table.loc[1, "present y"]) and bool(table.loc[1, "predicted y"])
    assert table.sort_values("defect_miou")["index"].tolist() == [0, 1]


def test_metrics_is_a_lower_layer_than_training():
    # metrics only counts; core.train runs models and imports it, never the other way round
    import subprocess
    import sys

    code = "import sys, core.metrics; sys.exit('core.train' in sys.modules or hasattr(core.metrics, 'evaluate'))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
