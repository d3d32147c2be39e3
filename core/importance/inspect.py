"""One group's filters, laid out for people: contribution, substitutability, combined score,
the |correlation| matrix in clustered order, and which filters plain L1 and collaborative
removal would cut. The dashboard's filter-correlation page draws exactly this."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from core.importance.collaborative import collaborative_removal_order, combined_scores
from core.importance.magnitude import ContributionImportance
from core.importance.substitutability import correlations_from, substitutability
from core.models.graph import PrunableGroup, PruningGraph, select_removal


@dataclass
class FilterAnalysis:
    group: str
    channels: int
    contribution: np.ndarray  # c, min-max normalised group L1
    substitutability: np.ndarray  # s: largest |R| with another filter
    combined: np.ndarray  # S = c (1 - beta s)
    abs_correlation: np.ndarray  # |R|, C x C
    clustered_order: np.ndarray  # filter order that puts correlated filters side by side
    removed_l1: list[int]
    removed_collaborative: list[int]
    beta: float

    @property
    def overlap(self) -> int:
        return len(set(self.removed_l1) & set(self.removed_collaborative))


def clustered_order(abs_correlation: np.ndarray) -> np.ndarray:
    """Average-linkage clustering on 1 - |R|: leaves in dendrogram order."""
    n = abs_correlation.shape[0]
    if n < 3:
        return np.arange(n)
    distance = np.clip(1.0 - abs_correlation, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2
    return leaves_list(linkage(squareform(distance, checks=False), method="average"))


@dataclass
class GroupMeasurement:
    """What scoring a group's filters needs from the data and the weights: the slow part
    (forward passes over calibration images), measured once per layer and model version."""
    group: str
    contribution: np.ndarray  # c, min-max normalised group L1
    correlation: np.ndarray  # R, signed, C x C
    abs_correlation: np.ndarray  # |R|
    clustered_order: np.ndarray


def measure_group(model: nn.Module, graph: PruningGraph, group_name: str, batches: Iterable[torch.Tensor],
                  seed: int = 0, source: str = "activations") -> GroupMeasurement:
    """One group's filter contributions and correlations: of its responses on calibration
    images, or with ``source="weights"`` the cosine of its filters' weights (no data read)."""
    group = graph.by_name[group_name]
    correlation = correlations_from(source, model, graph, batches, groups=[group], seed=seed)[group_name]
    contribution = ContributionImportance().contribution(graph.tp_group(group, range(group.channels)))
    abs_corr = np.abs(correlation)
    return GroupMeasurement(group=group_name, contribution=contribution, correlation=correlation,
                            abs_correlation=abs_corr, clustered_order=clustered_order(abs_corr))


def score_group(measured: GroupMeasurement, group: PrunableGroup, beta: float = 0.5,
                remove: int | None = None) -> FilterAnalysis:
    """Scores and selections from a measurement (milliseconds): what plain L1 and
    collaborative removal would cut (``remove`` filters; default half) at this ``beta``."""
    contribution, correlation = measured.contribution, measured.correlation
    remove = group.channels // 2 if remove is None else int(remove)
    order = collaborative_removal_order(contribution, correlation, beta)
    ranks = np.empty(order.size)
    ranks[order] = np.arange(order.size)
    return FilterAnalysis(
        group=measured.group, channels=group.channels, contribution=contribution,
        substitutability=substitutability(correlation),
        combined=combined_scores(contribution, substitutability(correlation), beta),
        abs_correlation=measured.abs_correlation, clustered_order=measured.clustered_order,
        removed_l1=select_removal(group, contribution.tolist(), remove),
        removed_collaborative=select_removal(group, ranks.tolist(), remove), beta=beta,
    )


def analyse_group(model: nn.Module, graph: PruningGraph, group_name: str, batches: Iterable[torch.Tensor],
                  beta: float = 0.5, remove: int | None = None, seed: int = 0) -> FilterAnalysis:
    """Score one group's filters on calibration images and say what each method would cut
    (``remove`` filters; default half): `measure_group`, then `score_group`."""
    return score_group(measure_group(model, graph, group_name, batches, seed=seed), graph.by_name[group_name],
                       beta=beta, remove=remove)
