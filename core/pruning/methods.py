"""Pruning methods by name: an allocator (how much per group) x a criterion (which filters).

Every method runs through the same prune step and the same prune-retrain loop, so that
differences between them come from the method alone. Ablations set the allocator and the
criterion directly. `METHODS` is the registry every list of methods reads (a new method is one
line); its allocators and criteria are names in `ALLOCATORS` and `CRITERIA`."""

from __future__ import annotations

from dataclasses import dataclass

from core.allocation.registry import ALLOCATORS
from core.importance.criteria import CRITERIA
from core.models.graph import PruningError


@dataclass(frozen=True)
class MethodSpec:
    allocator: str
    criterion: str
    description: str


METHODS: dict[str, MethodSpec] = {
    "collaborative": MethodSpec("scoring-network", "collaborative",
                                "the method: scoring-network allocation, combined score, collaborative removal"),
    "uniform-l1": MethodSpec("uniform", "l1", "one ratio everywhere, smallest group L1 norm (Li et al. 2017)"),
    "global-l1": MethodSpec("global", "l1", "global ranking of normalised L1 norms (Torch-Pruning's default)"),
    "fpgm": MethodSpec("uniform", "fpgm", "filters nearest the geometric median (He et al. 2019)"),
    "bn-scale": MethodSpec("global", "bn-scale", "global ranking of BatchNorm scales (network slimming)"),
    "random": MethodSpec("uniform", "random", "random filters, uniform ratio (a sanity floor)"),
}


def resolve_method(method: str, allocator: str | None = None, criterion: str | None = None) -> MethodSpec:
    """The named method, with the allocator or criterion overridden for ablations."""
    if method not in METHODS:
        raise PruningError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    base = METHODS[method]
    allocator = allocator or base.allocator
    criterion = criterion or base.criterion
    if allocator not in ALLOCATORS:
        raise PruningError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    if criterion not in CRITERIA:
        raise PruningError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if (allocator, criterion) == (base.allocator, base.criterion):
        return base
    return MethodSpec(allocator, criterion, f"{method} with allocator {allocator}, criterion {criterion}")
