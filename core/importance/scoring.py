"""Scoring every group's filters with one criterion: the correlations it needs measured first,
then one score per channel per group (what the allocators rank and the step cuts by)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from core.importance.criteria import NEEDS_CORRELATION, make_importance
from core.importance.magnitude import ContributionImportance
from core.importance.substitutability import DEFAULT_POSITIONS, correlations_from
from core.models.graph import PruningGraph


@dataclass
class GroupAnalysis:
    """What scoring saw in the groups: data for the allocators and the dashboard's charts."""

    scores: dict[str, np.ndarray]  # criterion score per channel, by group
    correlations: dict[str, np.ndarray]  # signed correlation matrices (empty without data)


def score_filters(model: nn.Module, graph: PruningGraph, criterion: str, images: Iterable[torch.Tensor], *,
                  beta: float = 0.5, seed: int = 0, correlation: str = "activations",
                  positions_per_batch: int = DEFAULT_POSITIONS, after_activation: bool = False) -> GroupAnalysis:
    """Every group's channel scores by ``criterion``; correlations (from ``correlation``, a key of
    `CORRELATION_SOURCES`, on ``images``) only when the criterion reads them."""
    correlations: dict[str, np.ndarray] = {}
    if criterion in NEEDS_CORRELATION:
        correlations = correlations_from(correlation, model, graph, images, positions_per_batch=positions_per_batch,
                                         after_activation=after_activation, seed=seed)
    importance = make_importance(criterion, model, correlations, beta, seed)
    fallback = ContributionImportance()
    scores = {}
    for g in graph.groups:
        tp_group = graph.tp_group(g, range(g.channels))
        value = importance(tp_group)
        if value is None:  # e.g. BN scale in a group without BatchNorm: fall back to L1
            value = fallback(tp_group)
        scores[g.name] = value.detach().cpu().double().numpy()
    return GroupAnalysis(scores=scores, correlations=correlations)
