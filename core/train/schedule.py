"""The learning-rate schedules of `fit`, all stepped once per training step: cosine (with an
optional linear warm-up) to 1% of the base rate, one-cycle, and "plateau" (constant after the
warm-up, cut by a factor on every validation plateau)."""

from __future__ import annotations

import math

import torch

from core.train.config import TrainConfig


class PlateauScale:
    """The rate multiplier of the "plateau" schedule: warm-up, then constant, cut on plateaus."""

    def __init__(self, warmup: int, factor: float):
        self.warmup, self.factor, self.scale = warmup, factor, 1.0

    def __call__(self, step: int) -> float:
        return self.scale * ((step + 1) / (self.warmup + 1) if step < self.warmup else 1.0)

    def cut(self) -> None:
        self.scale *= self.factor


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(total_steps, 2), pct_start=0.3,
        )
    warmup = int(round(config.warmup_fraction * total_steps))
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, PlateauScale(warmup, config.plateau_factor))

    def cosine(step: int) -> float:  # linear warm-up, then cosine to 1% of the base rate at the last step
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = (min(step, total_steps) - warmup) / max(total_steps - warmup, 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def cut_plateau_rate(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Cut a "plateau" schedule's rate by its factor, from the next step on."""
    plateau = scheduler.lr_lambdas[0]
    plateau.cut()
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * plateau(scheduler.last_epoch)
