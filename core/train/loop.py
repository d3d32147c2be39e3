"""The training loop: `fit` trains a model in place, reporting `Progress` to a callback that
can stop it, and `fine_tune` is the same loop on a pruned model.

One loop serves both training from scratch and fine-tuning after pruning: the optimiser and
the schedule are built inside `fit`, from the parameters the model has *now*, so a pruned
model is fine-tuned on its own (smaller) parameters. The loss is core.train.loss's.

Early stopping watches the validation defect mIoU and the best weights are restored at the
end, also when the user stops the loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from core.errors import DefectPruneError
from core.metrics import SegmentationMetrics
from core.models.runtime import eval_mode
from core.precision import InvalidPrecisionError, autocast, resolve_precision, to_channels_last, to_standard_format
import core.train.distributed as distributed
from core.train.config import InvalidTrainConfigError, TrainConfig
from core.train.datasets import (
    EmptySplitError, dataset_class_names, defect_sampling_weights, image_pixel_counts, set_epoch,
)
from core.train.device import TorchThreads, resolve_device, seed_everything, seed_worker
from core.train.evaluation import evaluate
from core.train.loss import SegmentationLoss, class_weights_from_counts, distillation_loss
from core.train.progress import Progress, ProgressCallback, StopRequested, report_progress
from core.train.schedule import cut_plateau_rate, make_scheduler


class TrainingDivergedError(DefectPruneError):
    pass


@dataclass
class TrainResult:
    epochs_run: int  # epochs completed (trained and validated)
    best_epoch: int | None  # the epoch whose weights the model holds at the end
    history: list[dict[str, Any]]
    best_metrics: SegmentationMetrics | None
    stopped_early: bool
    stopped_by_user: bool
    seconds: float
    class_weights: list[float] = field(default_factory=list)
    precision: str = "fp32"  # what the forward passes ran in (auto resolved)
    memory_format: str = "contiguous"
    distill_weight: float = 0.0
    train_step_seconds: float | None = None  # mean wall time of one training step
    teacher_step_seconds: float | None = None  # of which the teacher's forward pass

    @property
    def best_val(self) -> dict[str, Any] | None:
        return self.best_metrics.to_dict() if self.best_metrics is not None else None

    @property
    def seconds_per_epoch(self) -> float | None:
        times = [h["seconds"] for h in self.history]
        return float(np.mean(times)) if times else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "stopped_by_user": self.stopped_by_user,
            "seconds": self.seconds,
            "seconds_per_epoch": self.seconds_per_epoch,
            "class_weights": self.class_weights,
            "precision": self.precision,
            "memory_format": self.memory_format,
            "distill_weight": self.distill_weight,
            "train_step_seconds": self.train_step_seconds,
            "teacher_step_seconds": self.teacher_step_seconds,
            "val": self.best_val,
            "history": self.history,
        }


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _Teacher:
    """The teacher of a distilled fit: forward passes without gradients (nothing of it learns)
    in the fit's precision, timed."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str):
        self.model, self.device, self.precision = model, device, precision
        self.seconds = 0.0

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.no_grad(), autocast(self.device, self.precision):
            logits = self.model(images)
        self.seconds += time.perf_counter() - start
        return logits


@contextlib.contextmanager
def _frozen_teacher(teacher: nn.Module | None, device: torch.device, precision: str,
                    channels_last: bool) -> Iterator[_Teacher | None]:
    """The teacher for the length of a fit: on the fit's device and memory layout and in eval
    mode (its BatchNorm statistics must not move); afterwards the standard layout and every
    module's own mode back, also when the fit raises. None in, None out (no distillation)."""
    if teacher is None:
        yield None
        return
    teacher.to(device)
    with eval_mode(teacher):
        if channels_last:
            to_channels_last(teacher)
        try:
            yield _Teacher(teacher, device, precision)
        finally:
            to_standard_format(teacher)


@dataclass
class _Session:
    """What one fit works with, set up before the first epoch and only read afterwards."""

    model: nn.Module
    config: TrainConfig
    val_ds: Dataset | None
    names: list[str]
    device: torch.device
    precision: str
    memory_format: torch.memory_format
    class_weights: np.ndarray
    criterion: SegmentationLoss
    loader: DataLoader
    steps: int  # training steps per epoch
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher: _Teacher | None  # set only when distilling
    progress: ProgressCallback | None
    forward: nn.Module | None = None  # the training forward passes' module: DDP in a torchrun run, else model


@dataclass
class _FitState:
    """What the fit learns as it goes: the history, the best epoch so far and the clocks."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    best_metrics: SegmentationMetrics | None = None
    epochs_without_gain: int = 0
    latest_metric: float | None = None  # the last validation's defect mIoU, for the reports
    done_steps: int = 0
    train_seconds: float = 0.0
    val_seconds: float = 0.0
    stopped_early: bool = False
    stopped_by_user: bool = False


def fit(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    config: TrainConfig,
    progress: ProgressCallback | None = None,
    class_names: Sequence[str] | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` in place and return what happened.

    Forward passes run in ``config.precision`` (bf16 autocast or fp32) with the model in
    channels_last when ``config.channels_last``; the model is handed back fp32 in the standard
    layout. With ``teacher`` and ``config.distill_weight`` > 0 the loss also pulls the model
    towards the teacher's softened outputs (the teacher is frozen and in eval mode meanwhile).

    The callback gets a `Progress` after every training batch and every validation batch;
    returning True (or raising `StopRequested`, or Ctrl-C) stops the loop, and the result then
    says ``stopped_by_user`` and the model holds the best weights validated so far. Without a
    validation set there is no early stopping and the model keeps its last weights."""
    device, precision, names = _check_fit(train_ds, config, class_names, teacher)
    distill = config.distill_weight > 0
    with TorchThreads(config.num_threads), \
            _frozen_teacher(teacher if distill else None, device, precision, config.channels_last) as taught:
        session = _start_session(model, train_ds, val_ds, config, progress, names, device, precision, taught)
        state = _FitState()
        start = time.perf_counter()
        try:
            for epoch in range(1, config.epochs + 1):
                if _run_epoch(session, state, epoch):
                    break
        except (StopRequested, KeyboardInterrupt):
            if distributed.active():  # the other ranks cannot stop at the same batch: the run ends here
                raise
            state.stopped_by_user = True
        finally:
            to_standard_format(model)
        if state.best_state is not None:
            model.load_state_dict(state.best_state)
        distributed.sync_from_main(model)  # every rank ends with rank 0's model (the one it saves)
    _refuse_diverged_weights(model)
    done = state.done_steps
    return TrainResult(
        epochs_run=len(state.history),
        best_epoch=state.best_epoch,
        history=state.history,
        best_metrics=state.best_metrics,
        stopped_early=state.stopped_early,
        stopped_by_user=state.stopped_by_user,
        seconds=time.perf_counter() - start,
        class_weights=[float(w) for w in session.class_weights],
        precision=precision,
        memory_format="channels_last" if config.channels_last else "contiguous",
        distill_weight=config.distill_weight if distill else 0.0,
        train_step_seconds=state.train_seconds / done if done else None,
        teacher_step_seconds=taught.seconds / done if taught is not None and done else None,
    )


def _check_fit(train_ds: Dataset, config: TrainConfig, class_names: Sequence[str] | None,
               teacher: nn.Module | None) -> tuple[torch.device, str, list[str]]:
    """Refuse a fit that cannot run, before anything is moved; the device, the resolved
    precision and the class names it runs with."""
    config.validate()
    if len(train_ds) == 0:
        raise EmptySplitError("the training split has no images; check the dataset and its split")
    device = resolve_device(config.device)
    try:
        precision = resolve_precision(config.precision, device)
    except InvalidPrecisionError as exc:
        raise InvalidTrainConfigError(str(exc)) from None
    if config.distill_weight > 0 and teacher is None:
        raise InvalidTrainConfigError("a distillation weight above 0 needs a teacher model")
    names = list(class_names) if class_names is not None else dataset_class_names(train_ds)
    if names is None:
        raise ValueError("class_names is needed when the dataset carries no index")
    return device, precision, names


def _start_session(model: nn.Module, train_ds: Dataset, val_ds: Dataset | None, config: TrainConfig,
                   progress: ProgressCallback | None, names: list[str], device: torch.device, precision: str,
                   teacher: _Teacher | None) -> _Session:
    """Seed, weigh the classes, put the model on its device and layout, and build the loader,
    the optimiser (on the parameters the model has now) and the schedule; in this order, which
    the seeded numbers depend on."""
    seed_everything(config.seed)
    per_image = image_pixel_counts(train_ds, len(names))
    weights = class_weights_from_counts(per_image.sum(axis=0), config.max_class_weight)
    criterion = SegmentationLoss(weights, dice_weight=config.dice_weight).to(device)
    model.to(device)
    if config.channels_last:
        to_channels_last(model)
    loader = _training_loader(train_ds, per_image, config, device)
    forward = distributed.wrap(model, device)
    steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    total_steps = steps * config.epochs
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return _Session(
        model=model, config=config, val_ds=val_ds, names=names, device=device, precision=precision,
        memory_format=torch.channels_last if config.channels_last else torch.contiguous_format,
        class_weights=weights, criterion=criterion, loader=loader, steps=steps, total_steps=total_steps,
        optimizer=optimizer, scheduler=make_scheduler(optimizer, config, total_steps), teacher=teacher,
        progress=progress, forward=forward,
    )


def _training_loader(train_ds: Dataset, per_image: np.ndarray, config: TrainConfig,
                     device: torch.device) -> DataLoader:
    """Seeded shuffling, or seeded draws that favour images with a defect (``defect_share``)."""
    generator = torch.Generator().manual_seed(config.seed)
    draw = defect_sampling_weights(per_image, config.defect_share)
    shard = distributed.training_sampler(len(train_ds), config.seed, draw)
    if shard is not None:  # a torchrun rank: its share of each epoch's draw, batch size per process
        return DataLoader(
            train_ds, batch_size=config.batch_size, sampler=shard, drop_last=len(shard) > config.batch_size,
            num_workers=config.num_workers, worker_init_fn=seed_worker if config.num_workers else None,
            pin_memory=device.type == "cuda",
        )
    sampler = None if draw is None else WeightedRandomSampler(
        torch.as_tensor(draw, dtype=torch.double), num_samples=len(train_ds), replacement=True, generator=generator)
    return DataLoader(
        train_ds, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        # a last batch of one image breaks BatchNorm after global pooling (DeepLab's ASPP)
        drop_last=len(train_ds) > config.batch_size,
        num_workers=config.num_workers, worker_init_fn=seed_worker if config.num_workers else None,
        pin_memory=device.type == "cuda",
    )


def _run_epoch(session: _Session, state: _FitState, epoch: int) -> bool:
    """Train and validate one epoch, record it and keep the best weights; True when early
    stopping ends the fit."""
    config = session.config
    epoch_start = time.perf_counter()
    train_loss = _train_epoch(session, state, epoch)
    record: dict[str, Any] = {
        "epoch": epoch, "train_loss": train_loss, "lr": session.optimizer.param_groups[0]["lr"],
    }
    metrics = None
    if session.val_ds is not None:
        metrics = _validate(session, state, epoch, train_loss)
        record.update({
            "val_defect_miou": metrics.defect_miou,
            "val_background_iou": metrics.background_iou,
            "val_dice": metrics.dice,
            "val_pixel_accuracy": metrics.pixel_accuracy,
            "val_per_class_iou": dict(metrics.per_class_iou),
        })
    record["seconds"] = time.perf_counter() - epoch_start
    state.history.append(record)
    _keep_best(session, state, epoch, metrics)
    report_progress(session.progress, Progress(
        phase="epoch", epoch=epoch, epochs=config.epochs, step=session.steps, steps=session.steps,
        loss=train_loss, metric=state.latest_metric, eta_seconds=_eta(session, state, epoch + 1),
        fraction=state.done_steps / session.total_steps,
    ))
    if config.patience is not None and state.epochs_without_gain >= config.patience:
        state.stopped_early = epoch < config.epochs
        return True
    return False


def _train_epoch(session: _Session, state: _FitState, epoch: int) -> float:
    """One pass over the training loader (at most ``steps`` batches); its mean loss."""
    config, optimizer = session.config, session.optimizer
    set_epoch(session.loader.dataset, epoch)
    distributed.set_sampler_epoch(session.loader, epoch)
    session.model.train()
    loss_sum, loss_count = 0.0, 0
    step_start = time.perf_counter()
    for step, (images, masks) in enumerate(session.loader, 1):
        if step > session.steps:
            break
        images = images.to(session.device, non_blocking=True).contiguous(memory_format=session.memory_format)
        masks = masks.to(session.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = _batch_loss(session, images, masks)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the loss became {loss.item()} at epoch {epoch}, step {step}; "
                "lower the learning rate (--lr) and train again"
            )
        loss.backward()
        optimizer.step()
        session.scheduler.step()
        loss_sum += loss.item() * images.shape[0]
        loss_count += images.shape[0]
        state.done_steps += 1
        now = time.perf_counter()
        state.train_seconds += now - step_start
        report_progress(session.progress, Progress(
            phase="train", epoch=epoch, epochs=config.epochs, step=step, steps=session.steps,
            loss=loss_sum / loss_count, metric=state.latest_metric, eta_seconds=_eta(session, state, epoch),
            fraction=state.done_steps / session.total_steps,
        ))
        step_start = time.perf_counter()  # the callback's own time is not training
    if distributed.active():  # the epoch's mean loss over every rank's images
        loss_sum, loss_count = (float(v) for v in distributed.reduce_sum(np.array([loss_sum, loss_count])))
    return loss_sum / max(loss_count, 1)


def _batch_loss(session: _Session, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The supervised loss of one batch, mixed with the distillation term when there is a teacher."""
    config = session.config
    with autocast(session.device, session.precision):
        logits = (session.model if session.forward is None else session.forward)(images)
    loss = session.criterion(logits, masks)
    if session.teacher is None:
        return loss
    teacher_logits = session.teacher.logits(images)
    return ((1 - config.distill_weight) * loss
            + config.distill_weight * distillation_loss(logits, teacher_logits, config.distill_temperature))


def _validate(session: _Session, state: _FitState, epoch: int, train_loss: float) -> SegmentationMetrics:
    """The validation pass, its batches reported as phase "validate" of this epoch."""
    config, progress = session.config, session.progress
    val_start = time.perf_counter()
    distributed.sync_from_main(session.model)  # BatchNorm statistics differ per rank under DDP

    def forward_validation(report: Progress) -> bool | None:
        if progress is None:
            return None
        return progress(Progress(
            phase="validate", epoch=epoch, epochs=config.epochs, step=report.step, steps=report.steps,
            loss=train_loss, metric=state.latest_metric, eta_seconds=None,
            fraction=state.done_steps / session.total_steps,
        ))

    metrics = evaluate(
        session.model, session.val_ds, session.device, config.eval_batch_size or config.batch_size,
        progress=forward_validation, class_names=session.names, per_image=False, num_workers=config.num_workers,
    ).metrics
    state.val_seconds += time.perf_counter() - val_start
    state.latest_metric = metrics.defect_miou
    return metrics


def _keep_best(session: _Session, state: _FitState, epoch: int, metrics: SegmentationMetrics | None) -> None:
    """Keep the weights of the best validated epoch so far and count the epochs without a
    gain; every ``plateau_patience`` of them the "plateau" schedule cuts the rate."""
    if metrics is None:  # no validation: the model keeps its last weights
        state.best_epoch = epoch
        return
    config = session.config
    # undefined defect mIoU: no defect in the truth and none predicted, which is perfect as
    # far as defects go
    score = metrics.defect_miou if metrics.defect_miou is not None else 100.0
    if state.best_state is None or score > state.best_score + config.min_delta:
        state.best_score, state.best_state, state.best_epoch = score, _cpu_state(session.model), epoch
        state.best_metrics = metrics
        state.epochs_without_gain = 0
        return
    state.epochs_without_gain += 1
    if config.schedule == "plateau" and state.epochs_without_gain % config.plateau_patience == 0:
        cut_plateau_rate(session.optimizer, session.scheduler)


def _eta(session: _Session, state: _FitState, epoch: int) -> float:
    """Seconds left from the start of ``epoch``: the training steps to go at the mean step
    time so far, and one validation pass per epoch to go."""
    per_step = state.train_seconds / max(state.done_steps, 1)
    per_val = state.val_seconds / max(epoch - 1, 1) if session.val_ds is not None else 0.0
    return (per_step * (session.total_steps - state.done_steps)
            + per_val * (session.config.epochs - epoch + 1))


def _refuse_diverged_weights(model: nn.Module) -> None:
    """A loss can stay finite while the weights overflow (--lr 1e30): refuse them before any save."""
    diverged = [name for name, tensor in model.state_dict().items()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if diverged:
        raise TrainingDivergedError(
            f"training diverged: {len(diverged)} weight tensor(s) are no longer finite (e.g. {diverged[0]}); "
            "lower the learning rate (--lr) and train again (nothing was saved)"
        )


def fine_tune(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    config: TrainConfig,
    progress: ProgressCallback | None = None,
    class_names: Sequence[str] | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Fine-tuning after pruning is `fit` on the pruned model: the optimiser is built on the
    parameters the model has now (``teacher``: the unpruned model to distil from). Kept as its
    own name so call sites say what they mean."""
    return fit(model, train_ds, val_ds, config, progress=progress, class_names=class_names, teacher=teacher)
