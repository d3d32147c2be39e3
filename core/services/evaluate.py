"""Metrics of a checkpoint on a dataset split: ``python -m core evaluate`` and the evaluate
job. Format, root and split seed default to those in the checkpoint's spec, and the input
size to the size the model was trained at (the format's default size on another format).
`preview_predictions` is the Model page's preview: a few images' predictions and their metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.services.datasets import CheckpointDataRequest
from core.services.request import setting

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch.nn as nn

    from core.data.base import DatasetIndex
    from core.metrics import EvaluationResult, SegmentationMetrics
    from core.models.zoo import ModelSpec
    from core.train import ProgressCallback


def _splits() -> list[str]:
    from core.data.base import SPLITS

    return list(SPLITS)


@dataclass(frozen=True, kw_only=True)
class EvaluateRequest(CheckpointDataRequest):
    KIND = "evaluate"

    split: str = setting("test", choices=_splits)
    per_image: str | None = setting(None, job=False, metavar="CSV",
                                    help="also write the per-image table to this CSV file")


@dataclass(frozen=True)
class EvaluateResult:
    """The command's JSON (``report``: split, size, images, metrics, time) and the whole
    evaluation (its per-image table)."""

    report: dict[str, Any]
    evaluation: EvaluationResult

    def to_json(self) -> dict[str, Any]:
        return dict(self.report)


def run_evaluate(request: EvaluateRequest, progress: ProgressCallback | None = None) -> EvaluateResult:
    from core.atomic import write_atomic
    from core.data.dataset import SegmentationDataset
    from core.models.checkpoint import load_checkpoint
    from core.train import EmptySplitError, TorchThreads, evaluate, resolve_device

    device = resolve_device(request.device)
    loaded = load_checkpoint(request.checkpoint, device="cpu")
    spec, model = loaded.spec, loaded.model
    index, size = request.dataset(spec)
    dataset = SegmentationDataset(index, request.split, size, spec.in_channels, limit=request.limit,
                                  normalisation=spec.normalisation)
    if len(dataset) == 0:
        raise EmptySplitError(f"the {request.split} split of {index.format} at {index.root} has no images")
    with TorchThreads(request.threads):
        result = evaluate(model, dataset, device, request.batch_size, progress=progress, class_names=spec.classes,
                          num_workers=request.workers)
    if request.per_image:
        # atomic: a full disk or a kill leaves the previous table (or none), never a partial one
        text = result.per_image.to_csv(index=False).encode("utf-8")
        write_atomic(Path(request.per_image), lambda handle: handle.write(text))
    report = {
        "checkpoint": str(Path(request.checkpoint)),
        "format": index.format,
        "root": str(index.root),
        "split": request.split,
        "size": list(size),
        "images": result.images,
        **result.metrics.to_dict(),
        "seconds": round(result.seconds, 3),
        "device": str(device),
    }
    return EvaluateResult(report=report, evaluation=result)


@dataclass(frozen=True)
class PredictionPreview:
    """A few images of a split with their ground truth and the model's prediction, and how
    well the model did on just those (the Model page's preview)."""

    split: str
    images: list[np.ndarray]  # uint8, native channels, at the model's input size
    truths: np.ndarray  # (N, H, W) class ids
    predictions: np.ndarray  # (N, H, W) class ids
    confusion: np.ndarray  # (N, C, C): one confusion matrix per image
    metrics: SegmentationMetrics  # of the N images together

    def __len__(self) -> int:
        return len(self.images)

    def per_class(self) -> pd.DataFrame:
        """Each defect class's IoU on these images and its pixels in the truth and in the
        prediction (None: a class in neither)."""
        import pandas as pd

        names = list(self.metrics.class_names[1:])
        return pd.DataFrame({"class": names, "IoU": [self.metrics.per_class_iou[name] for name in names],
                             "pixels in truth": self.confusion.sum(axis=(0, 2))[1:],
                             "pixels predicted": self.confusion.sum(axis=(0, 1))[1:]})


def preview_predictions(model: nn.Module, spec: ModelSpec, index: DatasetIndex, split: str,
                        count: int) -> PredictionPreview:
    """The model's predictions on the first ``count`` images of ``split`` (at its input size,
    with its normalisation), beside their ground truth, and the metrics of those images."""
    import numpy as np
    import torch

    from core.data.dataset import SegmentationDataset
    from core.metrics import SegmentationMetrics, batch_confusion
    from core.predictions import predict_split

    shown = SegmentationDataset(index, split, tuple(spec.input_size), spec.in_channels, limit=count,
                                normalisation=spec.normalisation)
    with torch.inference_mode():
        predictions = predict_split(model, shown)
    images, truths = [], []
    for i in range(len(predictions)):
        image, truth = shown.raw(i)
        images.append(image)
        truths.append(truth)
    truth_stack = np.stack(truths)
    confusion = batch_confusion(predictions, truth_stack, len(spec.classes))
    metrics = SegmentationMetrics.from_confusion(confusion.sum(axis=0), spec.classes)
    return PredictionPreview(split=split, images=images, truths=truth_stack, predictions=predictions,
                             confusion=confusion, metrics=metrics)
