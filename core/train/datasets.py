"""What training and evaluation read off a dataset: the index behind `Subset`s, class names,
image paths, pixel counts per class, and the draw weights that favour images with a defect."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from core.errors import DefectPruneError


class EmptySplitError(DefectPruneError):
    pass


def base_dataset(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """Unwrap `Subset`s down to the dataset that holds the index, with the row numbers."""
    rows: list[int] | None = None
    while isinstance(dataset, Subset):
        indices = list(dataset.indices)
        rows = indices if rows is None else [indices[i] for i in rows]
        dataset = dataset.dataset
    return dataset, rows


def dataset_class_names(dataset: Dataset) -> list[str] | None:
    base, _ = base_dataset(dataset)
    index = getattr(base, "index", None)
    classes = getattr(index, "classes", None)
    return list(classes) if classes else None


def dataset_image_paths(dataset: Dataset) -> list[str] | None:
    base, rows = base_dataset(dataset)
    samples = getattr(base, "samples", None)
    if samples is None or "image" not in getattr(samples, "columns", ()):
        return None
    paths = [str(p) for p in samples["image"]]
    return [paths[i] for i in rows] if rows is not None else paths


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Tell a dataset with per-epoch augmentation which epoch it serves."""
    base, _ = base_dataset(dataset)
    if hasattr(base, "set_epoch"):
        base.set_epoch(epoch)


def image_pixel_counts(dataset: Dataset, num_classes: int) -> np.ndarray:
    """Pixels of each class in each image, shape (images, classes): from the index's
    ``pixel_counts`` when the dataset has one (no image is read), otherwise by reading every
    mask once."""
    base, rows = base_dataset(dataset)
    samples = getattr(base, "samples", None)
    counts = np.zeros((len(dataset), num_classes), np.int64)
    if samples is not None and "pixel_counts" in getattr(samples, "columns", ()):
        counts_column = list(samples["pixel_counts"])
        if rows is not None:
            counts_column = [counts_column[i] for i in rows]
        for row, item in zip(counts, counts_column):
            values = np.asarray(item, np.int64)[:num_classes]
            row[: values.size] = values
        return counts
    for i in range(len(dataset)):
        mask = torch.as_tensor(dataset[i][1]).long().ravel()
        mask = mask[(mask >= 0) & (mask < num_classes)]
        counts[i] = torch.bincount(mask, minlength=num_classes).numpy()
    return counts


def class_pixel_counts(dataset: Dataset, num_classes: int) -> np.ndarray:
    """Pixels of each class over the dataset."""
    return image_pixel_counts(dataset, num_classes).sum(axis=0)


def defect_sampling_weights(per_image: np.ndarray, defect_share: float | None) -> np.ndarray | None:
    """Per-image draw weights that make images with a defect at least ``defect_share`` of the
    draws, or None where they already are (or there are none, or no share is asked for).
    Magnetic tile is 70% defect-free images with defects under 1% of the pixels: shuffled
    plainly, most batches teach the model that nothing is ever a defect."""
    has_defect = per_image[:, 1:].sum(axis=1) > 0
    share = has_defect.mean() if len(has_defect) else 0.0
    if not defect_share or share >= defect_share or share == 0.0 or share == 1.0:
        return None
    return np.where(has_defect, defect_share / share, (1.0 - defect_share) / (1.0 - share))
