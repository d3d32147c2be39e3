"""Segmentation accuracy from confusion matrices accumulated over a whole split.

Why a confusion matrix: IoU averaged image by image over-weights small images and images
without a class; summing intersections and unions over the split (what the METHOD calls
"accumulated over the whole evaluation split") does not. Every IoU-type number here is in
percent (0-100), so a "drop" reads directly in IoU points.

The rule for a class that is absent from both the prediction and the ground truth over the
whole split: its IoU and Dice are undefined (0/0). They are reported as ``None`` and the class
is left out of every mean (defect mIoU, Dice). A class present in only one of the two has a
defined value (0 when it is only predicted, or only missed). When no defect class is defined
at all, defect mIoU and Dice are ``None``. The same rule applies per image in the per-image
table, where undefined values are NaN.

This module only counts; running a model over a split is `core.train.evaluate`, one layer up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


class ConfusionMatrix:
    """Counts pixels by (true class, predicted class); ``matrix[t, p]``.

    ``update`` takes class-id maps of any shape (a batch or one image, numpy or torch).
    Target pixels outside 0..num_classes-1 (an "ignore" value such as 255) are skipped."""

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError("a segmentation needs at least two classes (background and one defect)")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: ArrayLike, target: ArrayLike) -> "ConfusionMatrix":
        pred_np = _as_numpy(pred).astype(np.int64, copy=False).ravel()
        target_np = _as_numpy(target).astype(np.int64, copy=False).ravel()
        if pred_np.shape != target_np.shape:
            raise ValueError(f"prediction has {pred_np.size} pixels but target has {target_np.size}")
        n = self.num_classes
        valid = (target_np >= 0) & (target_np < n)
        pred_np = np.clip(pred_np[valid], 0, n - 1)
        self.matrix += np.bincount(n * target_np[valid] + pred_np, minlength=n * n).reshape(n, n)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self.matrix += other.matrix
        return self

    def reset(self) -> None:
        self.matrix[:] = 0


def _iou_dice(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice in percent; NaN where a class is in neither truth nor prediction.
    ``matrix`` may be (C, C) or a stack (..., C, C)."""
    tp = np.diagonal(matrix, axis1=-2, axis2=-1).astype(np.float64)
    truth = matrix.sum(axis=-1).astype(np.float64)  # row sums: pixels of the class in truth
    predicted = matrix.sum(axis=-2).astype(np.float64)  # column sums: pixels predicted as it
    union = truth + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, 100.0 * tp / union, np.nan)
        dice = np.where(truth + predicted > 0, 100.0 * 2 * tp / (truth + predicted), np.nan)
    return iou, dice


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else None


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


@dataclass
class SegmentationMetrics:
    """Split-level accuracy. Class 0 is background; "defect" means every other class."""

    class_names: list[str]
    per_class_iou: dict[str, float | None]
    per_class_dice: dict[str, float | None]
    defect_miou: float | None  # mean IoU over defect classes with a defined IoU
    background_iou: float | None
    dice: float | None  # mean Dice (= F1) over defect classes with a defined Dice
    pixel_accuracy: float | None
    pixels: int
    undefined_classes: list[str] = field(default_factory=list)  # absent from truth and prediction

    @classmethod
    def from_confusion(cls, confusion: ConfusionMatrix | np.ndarray,
                       class_names: Sequence[str] | None = None) -> "SegmentationMetrics":
        matrix = confusion.matrix if isinstance(confusion, ConfusionMatrix) else np.asarray(confusion)
        n = matrix.shape[0]
        names = list(class_names) if class_names is not None else [f"class {i}" for i in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} class names for a {n}-class confusion matrix")
        iou, dice = _iou_dice(matrix)
        total = int(matrix.sum())
        return cls(
            class_names=names,
            per_class_iou={name: _none_if_nan(v) for name, v in zip(names, iou)},
            per_class_dice={name: _none_if_nan(v) for name, v in zip(names, dice)},
            defect_miou=_mean_defined(iou[1:]),
            background_iou=_none_if_nan(iou[0]),
            dice=_mean_defined(dice[1:]),
            pixel_accuracy=100.0 * float(np.trace(matrix)) / total if total else None,
            pixels=total,
            undefined_classes=[name for name, v in zip(names, iou) if np.isnan(v)],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the keys the command line prints and checkpoints store."""
        return {
            "defect_miou": self.defect_miou,
            "per_class_iou": dict(self.per_class_iou),
            "per_class_dice": dict(self.per_class_dice),
            "background_iou": self.background_iou,
            "dice": self.dice,
            "pixel_accuracy": self.pixel_accuracy,
            "pixels": self.pixels,
            "undefined_classes": list(self.undefined_classes),
        }


# ---------------------------------------------------------------- per image
def batch_confusion(pred: ArrayLike, target: ArrayLike, num_classes: int) -> np.ndarray:
    """One confusion matrix per image: (B, H, W) maps -> (B, C, C), by one bincount."""
    pred_np = _as_numpy(pred).astype(np.int64, copy=False)
    target_np = _as_numpy(target).astype(np.int64, copy=False)
    b = pred_np.shape[0]
    n = num_classes
    pred_np = np.clip(pred_np.reshape(b, -1), 0, n - 1)
    target_np = target_np.reshape(b, -1)
    valid = (target_np >= 0) & (target_np < n)
    offsets = np.arange(b, dtype=np.int64)[:, None] * n * n
    codes = (offsets + n * target_np + pred_np)[valid]
    return np.bincount(codes, minlength=b * n * n).reshape(b, n, n)


def per_image_table(confusions: np.ndarray, class_names: Sequence[str],
                    image_paths: Sequence[str] | None = None) -> pd.DataFrame:
    """The per-image table the comparison page sorts: one row per image with

    ``index``, ``image``, ``defect_miou``, ``pixel_accuracy``, ``iou <class>`` (NaN when the
    class is in neither the truth nor the prediction of that image), ``present <class>``
    (the class is in the ground truth) and ``predicted <class>`` for every class."""
    confusions = np.asarray(confusions)
    names = list(class_names)
    iou, _ = _iou_dice(confusions)
    truth = confusions.sum(axis=-1)
    predicted = confusions.sum(axis=-2)
    totals = confusions.sum(axis=(-2, -1))
    correct = np.trace(confusions, axis1=-2, axis2=-1)
    count = confusions.shape[0]
    with np.errstate(invalid="ignore"):
        defect_iou = iou[:, 1:]
        defined = ~np.isnan(defect_iou)
        sums = np.where(defined, defect_iou, 0.0).sum(axis=1)
        defect_miou = np.where(defined.any(axis=1), sums / np.maximum(defined.sum(axis=1), 1), np.nan)
        accuracy = np.where(totals > 0, 100.0 * correct / np.maximum(totals, 1), np.nan)
    data: dict[str, Any] = {
        "index": np.arange(count),
        "image": list(image_paths) if image_paths is not None else [""] * count,
        "defect_miou": defect_miou,
        "pixel_accuracy": accuracy,
    }
    for c, name in enumerate(names):
        data[f"iou {name}"] = iou[:, c]
    for c, name in enumerate(names):
        data[f"present {name}"] = truth[:, c] > 0
    for c, name in enumerate(names):
        data[f"predicted {name}"] = predicted[:, c] > 0
    return pd.DataFrame(data)


@dataclass
class EvaluationResult:
    """Metrics of a model on one split and the per-image table behind them."""

    metrics: SegmentationMetrics
    per_image: pd.DataFrame
    confusion: np.ndarray
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return len(self.per_image)

