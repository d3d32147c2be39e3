"""The training loop: `fit` trains a model in place, reporting `Progress` to a callback that
can stop it, and `fine_tune` is the same loop on a pruned model.

One loop serves both training from scratch and fine-tuning after pruning: the optimiser and
the schedule are built inside `fit`, from the parameters the model has *now*, so a pruned
model is fine-tuned on its own (smaller) parameters. The loss is core.train.loss's.

Early stopping watches the validation defect mIoU and the best weights are restored at the
end, also when the user stops the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from core.errors import DefectPruneError
from core.metrics import SegmentationMetrics
from core.precision import InvalidPrecisionError, autocast, resolve_precision, to_channels_last, to_standard_format
from core.train.config import InvalidTrainConfigError, TrainConfig
from core.train.datasets import (
    EmptySplitError, dataset_class_names, defect_sampling_weights, image_pixel_counts, set_epoch,
)
from core.train.device import TorchThreads, resolve_device, seed_everything, seed_worker
from core.train.evaluation import evaluate
from core.train.loss import SegmentationLoss, class_weights_from_counts, distillation_loss
from core.train.progress import Progress, ProgressCallback, StopRequested, report_progress
from core.train.schedule import make_scheduler


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
    config.validate()
    if len(train_ds) == 0:
        raise EmptySplitError("the training split has no images; check the dataset and its split")
    device = resolve_device(config.device)
    try:
        precision = resolve_precision(config.precision, device)
    except InvalidPrecisionError as exc:
        raise InvalidTrainConfigError(str(exc)) from None
    distill = config.distill_weight > 0
    if distill and teacher is None:
        raise InvalidTrainConfigError("a distillation weight above 0 needs a teacher model")
    names = list(class_names) if class_names is not None else dataset_class_names(train_ds)
    if names is None:
        raise ValueError("class_names is needed when the dataset carries no index")
    num_classes = len(names)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    with TorchThreads(config.num_threads):
        seed_everything(config.seed)
        per_image = image_pixel_counts(train_ds, num_classes)
        weights = class_weights_from_counts(per_image.sum(axis=0), config.max_class_weight)
        criterion = SegmentationLoss(weights, dice_weight=config.dice_weight).to(device)
        model.to(device)
        if config.channels_last:
            to_channels_last(model)
        teacher_was_training = teacher is not None and teacher.training
        if distill:
            teacher.to(device).eval()  # its forward runs under no_grad
            if config.channels_last:
                to_channels_last(teacher)
        generator = torch.Generator().manual_seed(config.seed)
        draw = defect_sampling_weights(per_image, config.defect_share)
        sampler = None if draw is None else WeightedRandomSampler(
            torch.as_tensor(draw, dtype=torch.double), num_samples=len(train_ds), replacement=True, generator=generator)
        loader = DataLoader(
            train_ds, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
            # a last batch of one image breaks BatchNorm after global pooling (DeepLab's ASPP)
            drop_last=len(train_ds) > config.batch_size,
            num_workers=config.num_workers, worker_init_fn=seed_worker if config.num_workers else None,
            pin_memory=device.type == "cuda",
        )
        steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
        total_steps = steps * config.epochs
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = make_scheduler(optimizer, config, total_steps)

        history: list[dict[str, Any]] = []
        best_score, best_state, best_epoch, best_metrics = -math.inf, None, None, None
        epochs_without_gain = 0
        stopped_early = stopped_by_user = False
        latest_metric: float | None = None
        done_steps, train_seconds, val_seconds, teacher_seconds = 0, 0.0, 0.0, 0.0
        start = time.perf_counter()

        def eta(epoch: int) -> float:
            per_step = train_seconds / max(done_steps, 1)
            per_val = val_seconds / max(epoch - 1, 1) if val_ds is not None else 0.0
            return per_step * (total_steps - done_steps) + per_val * (config.epochs - epoch + 1)

        try:
            for epoch in range(1, config.epochs + 1):
                epoch_start = time.perf_counter()
                set_epoch(train_ds, epoch)
                model.train()
                loss_sum, loss_count = 0.0, 0
                step_start = time.perf_counter()
                for step, (images, masks) in enumerate(loader, 1):
                    if step > steps:
                        break
                    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                    masks = masks.to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device, precision):
                        logits = model(images)
                    loss = criterion(logits, masks)
                    if distill:
                        teacher_start = time.perf_counter()
                        with torch.no_grad(), autocast(device, precision):
                            teacher_logits = teacher(images)
                        teacher_seconds += time.perf_counter() - teacher_start
                        loss = ((1 - config.distill_weight) * loss + config.distill_weight
                                * distillation_loss(logits, teacher_logits, config.distill_temperature))
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(
                            f"the loss became {loss.item()} at epoch {epoch}, step {step}; "
                            "lower the learning rate (--lr) and train again"
                        )
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum += loss.item() * images.shape[0]
                    loss_count += images.shape[0]
                    done_steps += 1
                    now = time.perf_counter()
                    train_seconds += now - step_start
                    step_start = now
                    report_progress(progress, Progress(
                        phase="train", epoch=epoch, epochs=config.epochs, step=step, steps=steps,
                        loss=loss_sum / loss_count, metric=latest_metric, eta_seconds=eta(epoch),
                        fraction=done_steps / total_steps,
                    ))
                    step_start = time.perf_counter()  # the callback's own time is not training
                train_loss = loss_sum / max(loss_count, 1)
                record: dict[str, Any] = {
                    "epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                }
                metrics = None
                if val_ds is not None:
                    val_start = time.perf_counter()

                    def forward_validation(report: Progress, epoch: int = epoch) -> bool | None:
                        if progress is None:
                            return None
                        return progress(Progress(
                            phase="validate", epoch=epoch, epochs=config.epochs, step=report.step,
                            steps=report.steps, loss=train_loss, metric=latest_metric,
                            eta_seconds=None, fraction=done_steps / total_steps,
                        ))

                    metrics = evaluate(
                        model, val_ds, device, config.eval_batch_size or config.batch_size,
                        progress=forward_validation, class_names=names, per_image=False,
                        num_workers=config.num_workers,
                    ).metrics
                    val_seconds += time.perf_counter() - val_start
                    latest_metric = metrics.defect_miou
                    record.update({
                        "val_defect_miou": metrics.defect_miou,
                        "val_background_iou": metrics.background_iou,
                        "val_dice": metrics.dice,
                        "val_pixel_accuracy": metrics.pixel_accuracy,
                        "val_per_class_iou": dict(metrics.per_class_iou),
                    })
                record["seconds"] = time.perf_counter() - epoch_start
                history.append(record)

                if val_ds is None:
                    best_epoch = epoch
                else:
                    # undefined defect mIoU: no defect in the truth and none predicted, which
                    # is perfect as far as defects go
                    score = metrics.defect_miou if metrics.defect_miou is not None else 100.0
                    if best_state is None or score > best_score + config.min_delta:
                        best_score, best_state, best_epoch, best_metrics = score, _cpu_state(model), epoch, metrics
                        epochs_without_gain = 0
                    else:
                        epochs_without_gain += 1
                        if config.schedule == "plateau" and epochs_without_gain % config.plateau_patience == 0:
                            plateau = scheduler.lr_lambdas[0]
                            plateau.cut()
                            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                                group["lr"] = base * plateau(scheduler.last_epoch)  # from the next step on
                report_progress(progress, Progress(
                    phase="epoch", epoch=epoch, epochs=config.epochs, step=steps, steps=steps,
                    loss=train_loss, metric=latest_metric, eta_seconds=eta(epoch + 1),
                    fraction=done_steps / total_steps,
                ))
                if config.patience is not None and epochs_without_gain >= config.patience:
                    stopped_early = epoch < config.epochs
                    break
        except (StopRequested, KeyboardInterrupt):
            stopped_by_user = True
        finally:
            to_standard_format(model)
            if distill:
                to_standard_format(teacher)
                teacher.train(teacher_was_training)
        if best_state is not None:
            model.load_state_dict(best_state)
    # a loss can stay finite while the weights overflow (--lr 1e30): refuse them before any save
    diverged = [name for name, tensor in model.state_dict().items()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if diverged:
        raise TrainingDivergedError(
            f"training diverged: {len(diverged)} weight tensor(s) are no longer finite (e.g. {diverged[0]}); "
            "lower the learning rate (--lr) and train again (nothing was saved)"
        )
    return TrainResult(
        epochs_run=len(history),
        best_epoch=best_epoch,
        history=history,
        best_metrics=best_metrics,
        stopped_early=stopped_early,
        stopped_by_user=stopped_by_user,
        seconds=time.perf_counter() - start,
        class_weights=[float(w) for w in weights],
        precision=precision,
        memory_format="channels_last" if config.channels_last else "contiguous",
        distill_weight=config.distill_weight if distill else 0.0,
        train_step_seconds=train_seconds / done_steps if done_steps else None,
        teacher_step_seconds=teacher_seconds / done_steps if distill and done_steps else None,
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
