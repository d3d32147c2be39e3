"""The method's criteria, which read measured correlations: the combined score S = c (1 - beta s)
and collaborative removal (the position in the greedy removal order)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

from core.importance.collaborative import collaborative_removal_order, order_to_scores, substitutability_scores
from core.importance.magnitude import ContributionImportance
from core.models.graph import PruningError


class _CorrelationImportance(ContributionImportance):
    def __init__(self, model: nn.Module, correlations: Mapping[str, np.ndarray], beta: float = 0.5):
        super().__init__()
        self.names = {m: n for n, m in model.named_modules()}
        self.correlations = correlations
        self.beta = beta

    def correlation_of(self, group) -> np.ndarray:
        name = self.names[group[0].dep.target.module]
        try:
            return self.correlations[name]
        except KeyError:
            raise PruningError(f"no correlation measured for group {name}; run the calibration first") from None


class SubstitutabilityImportance(_CorrelationImportance):
    def __call__(self, group) -> torch.Tensor:
        return torch.from_numpy(substitutability_scores(self.contribution(group), self.correlation_of(group), self.beta))


class CollaborativeImportance(_CorrelationImportance):
    def removal_order(self, group) -> np.ndarray:
        return collaborative_removal_order(self.contribution(group), self.correlation_of(group), self.beta)

    def __call__(self, group) -> torch.Tensor:
        return torch.from_numpy(order_to_scores(self.removal_order(group)))
