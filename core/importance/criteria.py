"""Every filter criterion by name: a Torch-Pruning `Importance` factory (a callable taking a
group and returning one score per channel, low = removed first). The command line's choices,
the job validation and the method table read `CRITERIA`; a new criterion is a module with its
`Importance` and one line here.

- ``l1``: contribution, the group L1 norm (summed over every coupled parameter).
- ``substitutability``: the combined score S = c x (1 - beta x s).
- ``collaborative``: S with collaborative removal; the score is the channel's position in the
  greedy removal order, so cutting the k lowest is exactly the greedy choice.
- baselines: ``fpgm`` (geometric median), ``bn-scale`` (|gamma|), ``random`` (seeded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch.nn as nn
import torch_pruning as tp

from core.importance.baselines import BNScaleImportance, FPGMImportance, SeededRandomImportance
from core.importance.correlated import CollaborativeImportance, SubstitutabilityImportance
from core.importance.magnitude import GroupL1Importance
from core.models.graph import PruningError


@dataclass(frozen=True)
class CriterionInputs:
    """What a criterion may read: correlations only when it says it needs them."""

    model: nn.Module | None
    correlations: Mapping[str, np.ndarray] | None
    beta: float
    seed: int


@dataclass(frozen=True)
class Criterion:
    build: Callable[[CriterionInputs], tp.importance.Importance]
    # scored from measured channel correlations (the step measures them first)
    needs_correlation: bool = False


CRITERIA: dict[str, Criterion] = {
    # raw group L1 (the ranking within a group is min-max's; the global allocator divides by the
    # group mean as Torch-Pruning's default global pruning does, not by a min-max span)
    "l1": Criterion(lambda i: GroupL1Importance()),
    "substitutability": Criterion(lambda i: SubstitutabilityImportance(i.model, i.correlations, i.beta),
                                  needs_correlation=True),
    "collaborative": Criterion(lambda i: CollaborativeImportance(i.model, i.correlations, i.beta),
                               needs_correlation=True),
    "fpgm": Criterion(lambda i: FPGMImportance(p=2, group_reduction="mean", normalizer=None)),
    "bn-scale": Criterion(lambda i: BNScaleImportance(group_reduction="mean", normalizer=None)),
    "random": Criterion(lambda i: SeededRandomImportance(i.seed)),
}
NEEDS_CORRELATION = frozenset(name for name, c in CRITERIA.items() if c.needs_correlation)


def make_importance(
    criterion: str,
    model: nn.Module | None = None,
    correlations: Mapping[str, np.ndarray] | None = None,
    beta: float = 0.5,
    seed: int = 0,
) -> tp.importance.Importance:
    if criterion not in CRITERIA:
        raise PruningError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    entry = CRITERIA[criterion]
    if entry.needs_correlation and (model is None or correlations is None):
        raise PruningError(f"criterion {criterion} needs the model and measured correlations")
    return entry.build(CriterionInputs(model=model, correlations=correlations, beta=beta, seed=seed))
