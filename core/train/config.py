"""The settings of one fit, checked in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import DefectPruneError
from core.precision import PRECISIONS

SCHEDULES = ("cosine", "onecycle", "plateau")


class InvalidTrainConfigError(DefectPruneError):
    pass


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
