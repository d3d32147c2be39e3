"""Filter scores and the method's allocation for one pruning step, nothing cut: what the
dashboard draws before a run (the score job; the Layer importance page reads its result).

The result is `ScoreResult`, written as ``scores.json`` (per group: scores, kept count, the
channels that would go) with the measured correlations beside it (``correlations.npz``, when
the criterion reads them); pages read it back with `ScoreResult.from_json`, never by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.progress import StageProgress
from core.services.prune import StepRequest
from core.services.request import FRACTION, POSITIVE_FLOAT, setting

if TYPE_CHECKING:
    import numpy as np



@dataclass(frozen=True, kw_only=True)
class ScoreRequest(StepRequest):
    KIND = "score"

    target: float = setting(0.5, check=FRACTION, help="MACs reduction the allocation aims at (with --cost latency: "
                                                      "the latency reduction)")
    target_latency: float | None = setting(None, check=POSITIVE_FLOAT, metavar="MS",
                                           help="latency the allocation aims at, in ms, on this machine's latency "
                                                "table (instead of --target)")


@dataclass(frozen=True)
class ScoreResult:
    checkpoint: str
    method: str
    allocator: str
    criterion: str
    target: float
    input_size: list[int]
    calibration_images: int
    allocation: dict[str, Any]  # `Allocation.to_dict()`: kept, keep ratios, importances, predicted cost
    details: dict[str, Any]  # what live tuning answers from: the scoring network's logits, the sensitivity curves
    groups: list[dict[str, Any]]  # per group in network order: name, channels, kept, scores, removed, ...
    correlations: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # not in scores.json

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ScoreResult:
        names = [f for f in cls.__dataclass_fields__ if f != "correlations"]
        return cls(**{name: payload[name] for name in names})

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "method": self.method, "allocator": self.allocator,
                "criterion": self.criterion, "target": self.target, "input_size": self.input_size,
                "calibration_images": self.calibration_images, "allocation": self.allocation,
                "details": self.details, "groups": self.groups}

    @property
    def group_importance(self) -> dict[str, float]:
        return self.allocation["group_importance"]

    @property
    def scale_importance(self) -> dict[str, float]:
        return self.allocation["scale_importance"]

    @property
    def class_importance(self) -> dict[str, Any] | None:
        return self.allocation.get("class_importance")

    @property
    def logits(self) -> Any:
        """The scoring network's logits (its allocation at any target), or None."""
        return self.details.get("logits")

    @property
    def sensitivity_curves(self) -> dict[str, Any] | None:
        """``{"drops": {group: [loss rise per level]}, "levels": [...]}`` of a sensitivity
        allocation, or None."""
        return self.details if self.details.get("drops") else None

    def summary(self) -> dict[str, Any]:
        """The job's result beside the file."""
        return {"groups": len(self.groups), "predicted": self.allocation.get("predicted"),
                "budget_met": self.allocation.get("budget_met")}


def run_score(request: ScoreRequest, progress: StageProgress) -> ScoreResult:
    """Score and allocate one step of ``request.method`` on the checkpoint (`plan_step`)."""
    from core.data.dataset import SegmentationDataset
    from core.models.checkpoint import load_checkpoint
    from core.precision import resolve_precision
    from core.pruning.loop import calibration_batches
    from core.pruning.methods import resolve_method
    from core.pruning.step import plan_step, pruning_context
    from core.train import StopRequested, TorchThreads, class_pixel_counts, class_weights_from_counts, resolve_device

    def stage(fraction: float, message: str) -> None:
        if progress(fraction, message):
            raise StopRequested()

    device = resolve_device(request.device)
    method = resolve_method(request.method, request.allocator, request.criterion)
    stage(0.02, "loading the checkpoint and the calibration images")
    loaded = load_checkpoint(request.checkpoint, device=device)
    spec, model = loaded.spec, loaded.model
    index, size = request.dataset(spec)
    train_ds = SegmentationDataset(index, "train", size, spec.in_channels, augment=False, limit=request.limit,
                                   normalisation=spec.normalisation)
    names = list(spec.classes)
    settings = request.step_settings(resolve_precision(request.precision, device))
    # the step's two phases start at these fractions; the allocation fills the rest
    phases = iter((0.1, 0.2))
    with TorchThreads(request.threads):
        batches = calibration_batches(train_ds, request.calibration_images, request.batch_size, request.seed)
        weights = class_weights_from_counts(class_pixel_counts(train_ds, len(names)))
        context = pruning_context(model, size, spec.in_channels, batches, names, weights, settings,
                                  progress=lambda fraction, message: stage(0.02 + 0.08 * fraction, message) or False)
        target = request.target
        if request.target_latency is not None:
            from core.services.prune import latency_target

            target, _ = latency_target(request, context.graph, request.target_latency, target)
        plan = plan_step(context, method, target,
                         progress=lambda fraction, message: stage(0.2 + 0.75 * fraction, message) or False,
                         on_phase=lambda message: stage(next(phases), message))
    return ScoreResult(
        checkpoint=str(Path(request.checkpoint).resolve()), method=request.method, allocator=method.allocator,
        criterion=method.criterion, target=target, input_size=list(size),
        calibration_images=sum(int(x.shape[0]) for x, _ in batches), allocation=plan.allocation.to_dict(),
        details=plan.live_details(), groups=plan.group_records(), correlations=plan.correlation_arrays())
