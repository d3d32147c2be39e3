"""The progress callback of every long step outside a training epoch: ``progress(fraction,
message)``, where a true answer asks the step to stop (None and False: go on)."""

from __future__ import annotations

from typing import Callable

StageProgress = Callable[[float, str], "bool | None"]
