"""Every filter criterion as a Torch-Pruning `Importance`: a callable taking a group and
returning one score per channel (low = removed first).

- ``l1``: contribution, the group L1 norm (summed over every coupled parameter), min-max
  normalised within the group.
- ``substitutability``: the combined score S = c x (1 - beta x s).
- ``collaborative``: S with collaborative removal; the score is the channel's position in the
  greedy removal order, so cutting the k lowest is exactly the greedy choice.
- baselines: ``fpgm`` (geometric median), ``bn-scale`` (|gamma|), ``random`` (seeded).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from core.importance.collaborative import (
    collaborative_removal_order, min_max, order_to_scores, substitutability_scores,
)
from core.pruning.graph import PruningError

CRITERIA = ["l1", "substitutability", "collaborative", "fpgm", "bn-scale", "random"]
NEEDS_CORRELATION = {"substitutability", "collaborative"}


class _WholeGroupReduce:
    """Torch-Pruning sizes a group's reduced scores by its first scored layer, which covers
    only part of the group when a depthwise conv roots a group spanning a concatenation
    (DeepLabV3+'s decoder); this sizes them by the group. Sum and mean reductions only."""

    def __call__(self, group, **kwargs):
        self._group_size = len(group[0].idxs)
        return super().__call__(group, **kwargs)

    def _reduce(self, group_imp, group_idxs):
        total = torch.zeros(self._group_size, dtype=torch.float32)
        count = 0
        for imp, root_idxs in zip(group_imp, group_idxs):
            if any(r is None for r in root_idxs):
                continue
            total.scatter_add_(0, torch.tensor(root_idxs), imp.float().cpu())
            count += 1
        return total / count if self.group_reduction == "mean" and count else total


class GroupL1Importance(_WholeGroupReduce, tp.importance.GroupMagnitudeImportance):
    """Group L1 summed over every coupled parameter, GroupNorm's affine weights included
    (Torch-Pruning's magnitude importance covers conv, linear, BatchNorm and LayerNorm only;
    FPN's decoder normalises with GroupNorm)."""

    def __init__(self):
        super().__init__(p=1, group_reduction="sum", normalizer=None)

    def __call__(self, group, **kwargs):
        self._group_norms = [(dep.layer, idxs, group[i].root_idxs) for i, (dep, idxs) in enumerate(group)
                             if dep.pruning_fn == tp.prune_groupnorm_out_channels and dep.layer.affine]
        return super().__call__(group, **kwargs)

    def _reduce(self, group_imp, group_idxs):
        for layer, idxs, root_idxs in self._group_norms:
            group_imp.append(layer.weight.data[idxs].abs().pow(self.p))
            group_idxs.append(root_idxs)
            if self.bias and layer.bias is not None:
                group_imp.append(layer.bias.data[idxs].abs().pow(self.p))
                group_idxs.append(root_idxs)
        return super()._reduce(group_imp, group_idxs)


class FPGMImportance(_WholeGroupReduce, tp.importance.FPGMImportance):
    pass


class BNScaleImportance(_WholeGroupReduce, tp.importance.BNScaleImportance):
    pass


class ContributionImportance(tp.importance.Importance):
    """c_i: group L1 norm of channel i, min-max normalised within the group."""

    def __init__(self):
        self._magnitude = GroupL1Importance()

    def contribution(self, group) -> np.ndarray:
        return min_max(self._magnitude(group).detach().cpu().numpy())

    def __call__(self, group) -> torch.Tensor:
        return torch.from_numpy(self.contribution(group))


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


class SeededRandomImportance(tp.importance.Importance):
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator, dtype=torch.float64)


def make_importance(
    criterion: str,
    model: nn.Module | None = None,
    correlations: Mapping[str, np.ndarray] | None = None,
    beta: float = 0.5,
    seed: int = 0,
) -> tp.importance.Importance:
    if criterion == "l1":
        # raw group L1 (the ranking within a group is min-max's; the global allocator divides
        # by the group mean as Torch-Pruning's default global pruning does, not by a min-max span)
        return GroupL1Importance()
    if criterion in NEEDS_CORRELATION:
        if model is None or correlations is None:
            raise PruningError(f"criterion {criterion} needs the model and measured correlations")
        cls = CollaborativeImportance if criterion == "collaborative" else SubstitutabilityImportance
        return cls(model, correlations, beta)
    if criterion == "fpgm":
        return FPGMImportance(p=2, group_reduction="mean", normalizer=None)
    if criterion == "bn-scale":
        return BNScaleImportance(group_reduction="mean", normalizer=None)
    if criterion == "random":
        return SeededRandomImportance(seed)
    raise PruningError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
