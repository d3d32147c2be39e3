"""Metrics of a checkpoint on a dataset split: ``python -m core evaluate`` and the evaluate
job. Format, root and split seed default to those in the checkpoint's spec, and the input
size to the size the model was trained at (the format's default size on another format)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.services.datasets import CheckpointDataRequest
from core.services.request import setting

if TYPE_CHECKING:
    from core.metrics import EvaluationResult
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
