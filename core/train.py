"""Training, fine-tuning and evaluation, each reporting `Progress` to a callback that can
stop the loop.

One loop serves both training from scratch and fine-tuning after pruning: the optimiser and
the schedule are built inside `fit`, from the parameters the model has *now*, so a pruned
model is fine-tuned on its own (smaller) parameters.

The loss is cross-entropy plus soft Dice over the defect classes, balanced so that a rare
defect counts as much as a common one:

- the Dice term is the mean over every defect class (present in the batch or not, so that
  predicting an absent class is penalised), background excluded: each defect class weighs
  the same whatever its pixel count;
- the cross-entropy weights each class by its inverse pixel frequency in the training split
  relative to the most frequent class (background), ``w_c = f_max / f_c``, clipped at
  ``max_class_weight``: a rare defect counts up to that many times a background pixel, never
  more. (Normalising to a mean weight of 1 instead, ``1 / (C f_c)``, gave background 0.17
  against 10 for every defect on magnetic tile, where defects are under 1% of the pixels: the
  model painted a quarter of the image as defect and reached 4 validation defect mIoU.)

Early stopping watches the validation defect mIoU and the best weights are restored at the
end, also when the user stops the loop.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler

from core.errors import DefectPruneError
from core.precision import PRECISIONS, InvalidPrecisionError, autocast, resolve_precision, to_channels_last, to_standard_format
from core.metrics import (
    EvaluationResult, SegmentationMetrics, batch_confusion, per_image_table,
)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "onecycle", "plateau")


# ---------------------------------------------------------------- errors
class DeviceUnavailableError(DefectPruneError):
    """CUDA was asked for on a machine without a usable CUDA device."""


class InvalidTrainConfigError(DefectPruneError):
    pass


class EmptySplitError(DefectPruneError):
    pass


class TrainingDivergedError(DefectPruneError):
    pass


class StopRequested(Exception):
    """Raised by a progress callback (or by the loop when the callback returns True) to stop
    training or evaluation. `fit` turns it into ``stopped_by_user``; `evaluate` lets it out."""


# ---------------------------------------------------------------- device
def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without CUDA is an error, not a fallback,
    so a user who asked for the GPU is never silently measured on the CPU."""
    if isinstance(name, torch.device):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "--device cuda was asked for but no CUDA device is available on this machine; "
                "use --device cpu (or auto)"
            )
        return torch.device(key)
    raise DeviceUnavailableError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")


# ---------------------------------------------------------------- config, progress, result
@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # or "onecycle", or "plateau" (constant rate cut on validation plateaus)
    patience: int | None = 8  # epochs without a better val defect mIoU; None: never stop early
    # "plateau": the rate is multiplied by plateau_factor after every plateau_patience epochs
    # without a better val defect mIoU, so an early stop comes after the rate was cut, not at
    # full rate (a cosine over the most epochs stopped early never anneals)
    plateau_patience: int = 3
    plateau_factor: float = 0.1
    min_delta: float = 0.0  # IoU points an epoch must gain to count as better
    seed: int = 0
    num_threads: int | None = None  # torch CPU threads during the fit (None: leave as is)
    device: str = "auto"
    max_steps_per_epoch: int | None = None  # cap for tests and quick fine-tunes
    num_workers: int = 0
    eval_batch_size: int | None = None  # default: batch_size
    max_class_weight: float = 10.0
    dice_weight: float = 1.0
    # images with a defect make at least this share of each epoch's draws (with replacement),
    # where the split has fewer; None or 0: plain shuffling
    defect_share: float | None = 0.5
    # forward passes in bf16 autocast where the device runs it fast ("auto"), or as asked;
    # the model trains in channels_last (conv nets); see core/precision.py
    precision: str = "auto"
    channels_last: bool = True
    warmup_fraction: float = 0.0  # share of the steps the rate climbs linearly before the schedule
    # distillation from a teacher handed to `fit` (the unpruned model of a prune run): the loss is
    # (1 - a) x supervised + a x T^2 x pixel-wise KL(teacher || student) at temperature T
    distill_weight: float = 0.0
    distill_temperature: float = 2.0

    def validate(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1 (got {self.batch_size})")
        if not self.lr >= 0 or not math.isfinite(self.lr):
            problems.append(f"learning rate must be a non-negative number (got {self.lr})")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            problems.append(f"weight decay must be non-negative (got {self.weight_decay})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.patience is not None and self.patience < 1:
            problems.append(f"patience must be at least 1 epoch, or none (got {self.patience})")
        if self.plateau_patience < 1:
            problems.append(f"plateau patience must be at least 1 epoch (got {self.plateau_patience})")
        if not 0.0 < self.plateau_factor < 1.0:
            problems.append(f"plateau factor must be between 0 and 1 (got {self.plateau_factor})")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"threads must be at least 1 (got {self.num_threads})")
        from core.config import max_workers

        if not 0 <= self.num_workers <= max_workers():
            problems.append(f"workers must be from 0 to {max_workers()} (DEFECTPRUNE_MAX_WORKERS; got {self.num_workers})")
        if self.defect_share is not None and not 0.0 <= self.defect_share < 1.0:
            problems.append(f"defect share must be from 0 to below 1 (got {self.defect_share})")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            problems.append(f"max steps per epoch must be at least 1 (got {self.max_steps_per_epoch})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warm-up fraction must be from 0 to below 1 (got {self.warmup_fraction})")
        if not 0.0 <= self.distill_weight <= 1.0:
            problems.append(f"distillation weight must be from 0 to 1 (got {self.distill_weight})")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            problems.append(f"distillation temperature must be a positive number (got {self.distill_temperature})")
        if problems:
            raise InvalidTrainConfigError("; ".join(problems))


@dataclass
class Progress:
    """What a long job reports after every batch. ``phase`` is "train" (a training batch),
    "validate" (a batch of the validation pass inside `fit`), "epoch" (an epoch trained and
    validated: ``loss`` is its mean training loss, ``metric`` its validation defect mIoU),
    "evaluate" or "predict". ``metric`` is otherwise the latest validation defect mIoU (None
    before the first validation); ``fraction`` is of the whole job."""

    phase: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None
    metric: float | None
    eta_seconds: float | None
    fraction: float


ProgressCallback = Callable[[Progress], "bool | None"]


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


def report_progress(progress: ProgressCallback | None, report: Progress) -> None:
    """Hand ``report`` to the callback; a callback answering True asks to stop."""
    if progress is not None and progress(report) is True:
        raise StopRequested()


# ---------------------------------------------------------------- datasets
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


def class_weights_from_counts(counts: Sequence[int] | np.ndarray, max_weight: float = 10.0) -> np.ndarray:
    """Inverse-frequency weights relative to the most frequent class, ``max(n) / n_c`` (that
    class weighs 1), clipped at ``max_weight``; a class without pixels gets ``max_weight`` (it
    never appears as a target, so only the clip matters)."""
    counts = np.asarray(counts, np.float64)
    if counts.max(initial=0.0) <= 0:
        return np.ones(counts.size)
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, counts.max() / counts, max_weight)
    return np.minimum(weights, max_weight)


# ---------------------------------------------------------------- loss
class SegmentationLoss(nn.Module):
    """Class-weighted cross-entropy + (1 - mean soft Dice over the defect classes)."""

    def __init__(self, class_weights: torch.Tensor | Sequence[float], dice_weight: float = 1.0,
                 smooth: float = 1.0):
        super().__init__()
        self.register_buffer("class_weights", torch.as_tensor(class_weights, dtype=torch.float32))
        self.dice_weight = dice_weight
        self.smooth = smooth

    def soft_dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-class soft Dice over the whole batch, shape (C,)."""
        probs = logits.float().softmax(dim=1)
        onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        denominator = probs.sum(dims) + onehot.sum(dims)
        return (2 * intersection + self.smooth) / (denominator + self.smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target, weight=self.class_weights)
        if self.dice_weight == 0 or logits.shape[1] < 2:
            return ce
        dice = self.soft_dice(logits, target)[1:].mean()
        return ce + self.dice_weight * (1 - dice)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)), summed over classes and averaged
    over pixels and images (Hinton et al. 2015, per pixel), in fp32. Zero when the two agree."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean()
    return temperature * temperature * kl


# ---------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _set_epoch(dataset: Dataset, epoch: int) -> None:
    base, _ = base_dataset(dataset)
    if hasattr(base, "set_epoch"):
        base.set_epoch(epoch)


class _PlateauScale:
    """The rate multiplier of the "plateau" schedule: warm-up, then constant, cut on plateaus."""

    def __init__(self, warmup: int, factor: float):
        self.warmup, self.factor, self.scale = warmup, factor, 1.0

    def __call__(self, step: int) -> float:
        return self.scale * ((step + 1) / (self.warmup + 1) if step < self.warmup else 1.0)

    def cut(self) -> None:
        self.scale *= self.factor


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(total_steps, 2), pct_start=0.3,
        )
    warmup = int(round(config.warmup_fraction * total_steps))
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _PlateauScale(warmup, config.plateau_factor))

    def cosine(step: int) -> float:  # linear warm-up, then cosine to 1% of the base rate at the last step
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = (min(step, total_steps) - warmup) / max(total_steps - warmup, 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class TorchThreads:
    """Set torch's CPU thread count for a block and put the previous value back."""

    def __init__(self, count: int | None):
        self.count = count
        self.previous = torch.get_num_threads()

    def __enter__(self) -> "TorchThreads":
        if self.count:
            torch.set_num_threads(self.count)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.count:
            torch.set_num_threads(self.previous)


# ---------------------------------------------------------------- evaluation
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
    split) and the per-image table. The model's train/eval mode is restored afterwards.
    A callback returning True raises `StopRequested`."""
    if len(dataset) == 0:
        raise EmptySplitError("the evaluation split has no images; pick another split or dataset")
    device = resolve_device(device)
    names = list(class_names) if class_names is not None else dataset_class_names(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    steps = len(loader)
    was_training = model.training
    model.to(device).eval()
    confusions: list[np.ndarray] = []
    start = time.perf_counter()
    try:
        for step, (images, masks) in enumerate(loader, 1):
            logits = model(images.to(device, non_blocking=True))
            if names is None:
                names = [f"class {i}" for i in range(logits.shape[1])]
            predictions = logits.argmax(dim=1).cpu()
            confusions.append(batch_confusion(predictions, masks, len(names)))
            elapsed = time.perf_counter() - start
            report_progress(progress, Progress(
                phase="evaluate", epoch=0, epochs=0, step=step, steps=steps, loss=None, metric=None,
                eta_seconds=elapsed / step * (steps - step), fraction=step / steps,
            ))
    finally:
        model.train(was_training)
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


# ---------------------------------------------------------------- training
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
            num_workers=config.num_workers, worker_init_fn=_worker_init if config.num_workers else None,
            pin_memory=device.type == "cuda",
        )
        steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
        total_steps = steps * config.epochs
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = _make_scheduler(optimizer, config, total_steps)

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
                _set_epoch(train_ds, epoch)
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


# ---------------------------------------------------------------- command-line view
class ProgressBar:
    """A tqdm bar on stderr fed by `Progress` reports: the command line's view of a job.
    When stderr is not a terminal (tqdm's ``disable=None``) there is no bar, only one line per
    finished epoch, so logs stay readable."""

    def __init__(self, description: str, disable: bool | None = None):
        self.description = description
        self.disable = disable
        self.bar = None

    def __call__(self, report: Progress) -> None:
        from tqdm.auto import tqdm

        if report.phase in ("validate", "epoch"):
            if self.bar is None:
                return
            if report.phase == "validate":
                self.bar.set_postfix_str(f"epoch {report.epoch}/{report.epochs} validating "
                                         f"{report.step}/{report.steps}", refresh=False)
                return
            metric = "n/a" if report.metric is None else f"{report.metric:.2f}"
            line = f"epoch {report.epoch}/{report.epochs} loss {report.loss:.4f} val defect mIoU {metric}"
            if self.bar.disable:  # no bar (stderr is not a terminal): one line per epoch for logs
                print(f"{self.description}: {line}", file=sys.stderr, flush=True)
            else:
                self.bar.set_postfix_str(line)
            return
        total = report.epochs * report.steps if report.phase == "train" else report.steps
        if self.bar is None or self.bar.total != total:
            self.close()
            self.bar = tqdm(total=total, desc=self.description, unit="batch", disable=self.disable,
                            dynamic_ncols=True)
        position = (report.epoch - 1) * report.steps + report.step if report.phase == "train" else report.step
        self.bar.update(position - self.bar.n)
        if report.phase == "train":
            metric = f" val mIoU {report.metric:.1f}" if report.metric is not None else ""
            self.bar.set_postfix_str(f"epoch {report.epoch}/{report.epochs} loss {report.loss:.3f}{metric}",
                                     refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

