"""What a long job reports after every batch, how a callback stops it, and the command
line's progress bar over those reports."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass


class StopRequested(Exception):
    """Raised by a progress callback (or by the loop when the callback returns True) to stop
    training or evaluation. `fit` turns it into ``stopped_by_user``; `evaluate` lets it out."""


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


def report_progress(progress: ProgressCallback | None, report: Progress) -> None:
    """Hand ``report`` to the callback; a callback answering True asks to stop."""
    if progress is not None and progress(report) is True:
        raise StopRequested()


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
