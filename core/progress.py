"""The progress callback of every long step outside a training epoch: ``progress(fraction,
message)``, where a true answer asks the step to stop (None and False: go on); and the
estimate of the time left that a job's progress supports (`estimate_remaining`), in words
(`duration_text`, `remaining_text`)."""

from __future__ import annotations

import math
from typing import Callable

StageProgress = Callable[[float, str], "bool | None"]

# below these the pace says nothing yet: the first report often only means "loaded"
MIN_FRACTION = 0.02  # of the whole job done since the estimate's start
MIN_SECONDS = 3.0  # run since then


def estimate_remaining(fraction: float, elapsed: float, start_fraction: float = 0.0,
                       min_fraction: float = MIN_FRACTION, min_seconds: float = MIN_SECONDS) -> float | None:
    """Seconds left at the pace so far: ``elapsed`` seconds took the job from
    ``start_fraction`` (where this attempt began: a resumed job starts part-way) to
    ``fraction``, and the rest goes as fast. None when that says nothing honest yet (under
    ``min_fraction`` done or ``min_seconds`` run, a fraction that went back, or not a number)."""
    if not all(math.isfinite(v) for v in (fraction, elapsed, start_fraction)):
        return None
    fraction = min(max(fraction, 0.0), 1.0)
    done = fraction - start_fraction
    if done < min_fraction or elapsed < min_seconds:
        return None
    return elapsed / done * (1.0 - fraction)


def duration_text(seconds: float) -> str:
    """``'8 s'``, ``'2 min 05 s'``, ``'1 h 07 min'``: seconds under an hour, minutes above."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def remaining_text(seconds: float | None) -> str:
    """An estimate of the time left, rounded as coarsely as an estimate deserves: ``'a few
    seconds left'``, ``'about 40 s left'``, ``'about 3 min left'``, ``'about 1 h 20 min
    left'``; ``''`` for None (no honest estimate)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    if seconds < 15:
        return "a few seconds left"
    if seconds < 55:
        return f"about {int(round(seconds / 10.0)) * 10} s left"
    minutes = seconds / 60.0
    if minutes < 90:
        return f"about {max(int(round(minutes)), 1)} min left"
    tens = int(round(minutes / 10.0)) * 10  # ten-minute steps
    hours, rest = divmod(tens, 60)
    return f"about {hours} h {rest} min left" if rest else f"about {hours} h left"
