"""Two models on the same images: masks, per-image and per-class changes, and cost side by
side. `core.services.compare` runs it for the dashboard's Compare page and its report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from core.progress import StageProgress
from core.errors import DefectPruneError
from core.metrics import SegmentationMetrics, batch_confusion, per_image_table
from core.models.checkpoint import load_checkpoint
from core.models.zoo import ModelSpec
from core.predictions import cached_predictions
from core.profile import checkpoint_size_bytes, count_macs, count_params, latency_in_turns
from core.train import Progress, ProgressCallback, StopRequested
from core.visual import diff_masks

# (fraction of the whole comparison, what is being done) -> stop? (as the services report)

# Where each part of a comparison ends, as a fraction of it: reading the images and their
# masks, then predicting with each model (the slow parts on a CPU, unless cached on disk).
READ_END, BEFORE_END, AFTER_END = 0.1, 0.55, 0.99


@dataclass
class Comparison:
    class_names: list[str]
    images: np.ndarray  # (N, H, W) or (N, H, W, 3) uint8, at the models' input size
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
    if before.pixel_normalisation != after.pixel_normalisation:
        problems.append(f"normalisation {before.pixel_normalisation.to_json()} against "
                        f"{after.pixel_normalisation.to_json()}")
    if problems:
        raise ComparisonError("the two models differ in " + "; ".join(problems) + ": compare a model with its own "
                              "pruned rounds, or two models trained on the same dataset at the same size")


def _report(progress: StageProgress | None, fraction: float, message: str) -> None:
    if progress is not None and progress(fraction, message) is True:
        raise StopRequested()


def _predicting(progress: StageProgress | None, start: float, end: float, which: str) -> ProgressCallback | None:
    """The prediction's per-batch callback, mapped onto [start, end] of the comparison."""
    if progress is None:
        return None

    def report(step: Progress) -> bool:
        message = f"predicting with the {which} model: batch {step.step} of {step.steps}"
        return progress(start + (end - start) * step.fraction, message) is True

    return report


def compare_models(before: str | Path, after: str | Path, dataset: Dataset, class_names: list[str],
                   progress: StageProgress | None = None) -> Comparison:
    """Predictions of both checkpoints on ``dataset`` (cached on disk), compared image by
    image (defect mIoU change, worst first) and class by class (IoU over the split).
    ``progress`` hears after every image read and every batch predicted; answering True
    raises `StopRequested`."""
    images, truth = [], []
    for i in range(len(dataset)):
        image, mask = dataset.raw(i)
        images.append(image)
        truth.append(mask)
        _report(progress, READ_END * (i + 1) / len(dataset), f"reading image {i + 1} of {len(dataset)}")
    masks_before = cached_predictions(before, dataset, progress=_predicting(progress, READ_END, BEFORE_END,
                                                                            "before")).masks
    _report(progress, BEFORE_END, "predicted with the before model")
    masks_after = cached_predictions(after, dataset, progress=_predicting(progress, BEFORE_END, AFTER_END,
                                                                          "after")).masks
    _report(progress, AFTER_END, "predicted with the after model")
    paths = [str(p) for p in dataset.samples["image"]] if hasattr(dataset, "samples") else None
    comparison = compare_masks(np.stack(images), np.stack(truth).astype(np.uint8), masks_before, masks_after,
                               class_names, paths)
    _report(progress, 1.0, f"compared {len(dataset)} images")
    return comparison


def compare_masks(images: np.ndarray, truth: np.ndarray, masks_before: np.ndarray, masks_after: np.ndarray,
                  class_names: list[str], paths: list[str] | None = None) -> Comparison:
    """Both models' masks against the truth: the per-image table (worst change first) and the
    per-class IoU over all images."""
    n = len(class_names)
    conf_before = batch_confusion(masks_before, truth, n)
    conf_after = batch_confusion(masks_after, truth, n)
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
    return Comparison(class_names=list(class_names), images=images, truth=truth, before=masks_before,
                      after=masks_after, per_image=per_image, per_class=per_class, metrics_before=metrics_before,
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


def cost_rows(checkpoints: Sequence[str | Path], runs: int = 10, threads: int = 1) -> list[dict]:
    """Per checkpoint: MACs, parameters, size on disk and batch-1 latency, the median per engine
    (torch, ONNX Runtime) and, under ``latency``, its spread over the timed runs (``median_ms``,
    ``p10_ms``, ``p90_ms`` per engine). The checkpoints are timed in turns (`latency_in_turns`)
    so their latencies are comparable on a busy machine; they take the same input."""
    loaded = [load_checkpoint(c) for c in checkpoints]
    specs = {(tuple(entry.spec.input_size), entry.spec.in_channels) for entry in loaded}
    if len(specs) > 1:
        raise ComparisonError(f"models with different inputs {sorted(specs)} are not timed side by side")
    ((size, channels),) = specs
    latencies = latency_in_turns([entry.model for entry in loaded], size, channels, runs=runs, warmup=2,
                                 threads=threads)
    rows = []
    for checkpoint, entry, latency in zip(checkpoints, loaded, latencies):
        spread = {engine: {"median_ms": r.median_ms, "p10_ms": r.p10_ms, "p90_ms": r.p90_ms}
                  for engine, r in latency.items()}
        rows.append({"checkpoint": str(checkpoint), "macs": count_macs(entry.model, size, channels),
                     "params": count_params(entry.model), "size_bytes": checkpoint_size_bytes(checkpoint),
                     "latency_torch_ms": latency["torch"].median_ms,
                     "latency_ort_ms": latency["onnxruntime"].median_ms, "latency": spread})
    return rows


def cost_row(checkpoint: str | Path, runs: int = 10, threads: int = 1) -> dict:
    """`cost_rows` of one checkpoint."""
    return cost_rows([checkpoint], runs=runs, threads=threads)[0]
