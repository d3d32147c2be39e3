"""A model's metrics on a whole split: the confusion matrix accumulated over every batch and
the per-image table behind it (the arithmetic is core.metrics'; running the model is here)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from core.metrics import EvaluationResult, SegmentationMetrics, batch_confusion, per_image_table
from core.models.runtime import eval_mode
import core.train.distributed as distributed
from core.train.datasets import EmptySplitError, dataset_class_names, dataset_image_paths
from core.train.device import resolve_device
from core.train.progress import Progress, ProgressCallback, report_progress


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: ProgressCallback | None = None,
    class_names: Sequence[str] | None = None,
    per_image: bool = True,
    num_workers: int = 0,
) -> EvaluationResult:
    """Metrics of ``model`` on every sample of ``dataset`` (confusion accumulated over the
    split) and the per-image table. Every module's train/eval mode is restored afterwards.
    A callback returning True raises `StopRequested`.

    In a torchrun run without ``per_image`` each rank evaluates its share of the batches and
    the confusion matrices are summed (`distributed.evaluation_rows`): the metrics are those of
    a single process on the whole split. With ``per_image`` every rank evaluates it all."""
    if len(dataset) == 0:
        raise EmptySplitError("the evaluation split has no images; pick another split or dataset")
    device = resolve_device(device)
    names = list(class_names) if class_names is not None else dataset_class_names(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    model.to(device)
    if distributed.active() and not per_image and names is not None:
        return _evaluate_shard(model, dataset, device, batch_size, progress, names, num_workers)
    with eval_mode(model):
        return split_metrics(loader, lambda images: model(images.to(device, non_blocking=True)), dataset, names,
                             per_image, progress)


def split_metrics(loader: DataLoader, logits_of: Callable[[torch.Tensor], Any], dataset: Dataset,
                  names: list[str] | None, per_image: bool, progress: ProgressCallback | None) -> EvaluationResult:
    """The evaluation loop of any engine: ``logits_of(images)`` (a torch model's or an ONNX
    session's, torch or numpy, N x C x H x W) for every batch of ``loader``, its argmax
    against the masks, one confusion matrix over the split and the per-image table behind it;
    ``names`` None: ``class i`` for each of the logits' channels."""
    steps = len(loader)
    confusions: list[np.ndarray] = []
    start = time.perf_counter()
    for step, (images, masks) in enumerate(loader, 1):
        logits = logits_of(images)
        if names is None:
            names = [f"class {i}" for i in range(logits.shape[1])]
        predictions = logits.argmax(1)
        if isinstance(predictions, torch.Tensor):
            predictions = predictions.cpu()
        confusions.append(batch_confusion(predictions, masks, len(names)))
        elapsed = time.perf_counter() - start
        report_progress(progress, Progress(
            phase="evaluate", epoch=0, epochs=0, step=step, steps=steps, loss=None, metric=None,
            eta_seconds=elapsed / step * (steps - step), fraction=step / steps,
        ))
    stacked = np.concatenate(confusions)
    confusion = stacked.sum(axis=0)
    table = per_image_table(stacked, names, dataset_image_paths(dataset)) if per_image else per_image_table(
        stacked[:0], names)
    return EvaluationResult(
        metrics=SegmentationMetrics.from_confusion(confusion, names),
        per_image=table,
        confusion=confusion,
        seconds=time.perf_counter() - start,
    )


def _evaluate_shard(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int,
                    progress: ProgressCallback | None, names: list[str], num_workers: int) -> EvaluationResult:
    """This rank's batches of the split, the confusion summed over every rank."""
    start = time.perf_counter()
    rows = distributed.evaluation_rows(dataset, batch_size)
    confusion = np.zeros((len(names), len(names)), np.int64)
    if rows:
        loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        with eval_mode(model):
            confusion = split_metrics(loader, lambda images: model(images.to(device, non_blocking=True)), dataset,
                                      names, False, progress).confusion.astype(np.int64)
    confusion = distributed.reduce_sum(confusion)
    return EvaluationResult(
        metrics=SegmentationMetrics.from_confusion(confusion, names),
        per_image=per_image_table(np.zeros((0, len(names), len(names)), np.int64), names),
        confusion=confusion,
        seconds=time.perf_counter() - start,
    )
