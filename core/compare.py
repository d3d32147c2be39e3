"""Two models on the same images: masks, per-image and per-class changes, and cost side by
side. The dashboard's Compare page and its downloadable report are built from this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from core.errors import DefectPruneError
from core.metrics import SegmentationMetrics, batch_confusion, per_image_table
from core.models.checkpoint import load_checkpoint
from core.models.zoo import ModelSpec
from core.predictions import cached_predictions
from core.profile import profile_model
from core.visual import diff_masks


@dataclass
class Comparison:
    class_names: list[str]
    truth: np.ndarray  # (N, H, W) class ids
    before: np.ndarray
    after: np.ndarray
    per_image: pd.DataFrame  # one row per image, worst change first
    per_class: pd.DataFrame  # class, iou_before, iou_after, change
    metrics_before: SegmentationMetrics
    metrics_after: SegmentationMetrics


class ComparisonError(DefectPruneError):
    """Two models that cannot be compared image by image."""


def check_comparable(before: ModelSpec, after: ModelSpec) -> None:
    """Refuse a comparison whose numbers would mean nothing: the same images go through both
    models and the same class ids are scored, so classes, image channels and input size must
    agree (a pruned model keeps all three of its baseline's)."""
    problems = []
    if list(before.classes) != list(after.classes):
        problems.append(f"classes {list(before.classes)} against {list(after.classes)}")
    if before.in_channels != after.in_channels:
        problems.append(f"{before.in_channels} against {after.in_channels} image channels")
    if tuple(before.input_size) != tuple(after.input_size):
        problems.append(f"input size {tuple(before.input_size)} against {tuple(after.input_size)}")
    if problems:
        raise ComparisonError("the two models differ in " + "; ".join(problems) + ": compare a model with its own "
                              "pruned rounds, or two models trained on the same dataset at the same size")


def compare_models(before: str | Path, after: str | Path, dataset: Dataset, class_names: list[str]) -> Comparison:
    """Predictions of both checkpoints on ``dataset`` (cached on disk), compared image by
    image (defect mIoU change, worst first) and class by class (IoU over the split)."""
    masks_before = cached_predictions(before, dataset).masks
    masks_after = cached_predictions(after, dataset).masks
    truth = np.stack([dataset.raw(i)[1] for i in range(len(dataset))]).astype(np.uint8)
    n = len(class_names)
    conf_before = batch_confusion(masks_before, truth, n)
    conf_after = batch_confusion(masks_after, truth, n)
    paths = [str(p) for p in dataset.samples["image"]] if hasattr(dataset, "samples") else None
    table_before = per_image_table(conf_before, class_names, paths)
    table_after = per_image_table(conf_after, class_names, paths)
    per_image = table_before[["index", "image"]].copy()
    for name in ["defect_miou"] + [f"iou {c}" for c in class_names[1:]]:
        per_image[f"{name} before"] = table_before[name]
        per_image[f"{name} after"] = table_after[name]
    per_image["change"] = per_image["defect_miou after"] - per_image["defect_miou before"]
    for c in class_names[1:]:
        per_image[f"present {c}"] = table_before[f"present {c}"]
    per_image = per_image.sort_values("change", na_position="last", kind="stable").reset_index(drop=True)
    metrics_before = SegmentationMetrics.from_confusion(conf_before.sum(axis=0), class_names)
    metrics_after = SegmentationMetrics.from_confusion(conf_after.sum(axis=0), class_names)
    per_class = pd.DataFrame({
        "class": class_names,
        "iou_before": [metrics_before.per_class_iou[c] for c in class_names],
        "iou_after": [metrics_after.per_class_iou[c] for c in class_names],
    })
    per_class["change"] = per_class["iou_after"].astype(float) - per_class["iou_before"].astype(float)
    return Comparison(class_names=list(class_names), truth=truth, before=masks_before, after=masks_after,
                      per_image=per_image, per_class=per_class, metrics_before=metrics_before,
                      metrics_after=metrics_after)


ALL_CLASSES = "all classes"


def pixel_changes(truth: np.ndarray, before: np.ndarray, after: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Pixels of one image gained and lost by the second model: a first row over all classes
    (predicted class = true class), then one row per defect class (membership of that class
    alone, as `diff_masks` defines it). Columns: class, gained, lost, net."""
    rows = []
    for name, class_id in [(ALL_CLASSES, None)] + [(c, i) for i, c in enumerate(class_names) if i > 0]:
        gained, lost = diff_masks(truth, before, after, class_id)
        rows.append({"class": name, "gained": int(gained.sum()), "lost": int(lost.sum())})
    frame = pd.DataFrame(rows, columns=["class", "gained", "lost"])
    frame["net"] = frame["gained"] - frame["lost"]
    return frame


def cost_row(checkpoint: str | Path, runs: int = 10, threads: int = 1) -> dict:
    """MACs, parameters, size on disk and batch-1 latency (torch and ONNX Runtime) of a checkpoint."""
    loaded = load_checkpoint(checkpoint)
    profile = profile_model(loaded.model, loaded.spec, checkpoint_dir=checkpoint, runs=runs, warmup=2,
                            threads=threads)
    return {"checkpoint": str(checkpoint), "macs": profile["macs"], "params": profile["params"],
            "size_bytes": profile["size_bytes"], "latency_torch_ms": profile["latency_ms"]["torch"],
            "latency_ort_ms": profile["latency_ms"].get("onnxruntime")}
