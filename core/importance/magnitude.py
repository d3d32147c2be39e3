"""Magnitude criteria: the group L1 norm over every coupled parameter, and the contribution c_i
(that norm min-max normalised within the group) that the method's scores build on."""

from __future__ import annotations

import numpy as np
import torch
import torch_pruning as tp

from core.importance.collaborative import min_max


class WholeGroupReduce:
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


class GroupL1Importance(WholeGroupReduce, tp.importance.GroupMagnitudeImportance):
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


class ContributionImportance(tp.importance.Importance):
    """c_i: group L1 norm of channel i, min-max normalised within the group."""

    def __init__(self):
        self._magnitude = GroupL1Importance()

    def contribution(self, group) -> np.ndarray:
        return min_max(self._magnitude(group).detach().cpu().numpy())

    def __call__(self, group) -> torch.Tensor:
        return torch.from_numpy(self.contribution(group))
