"""Channel masks through forward hooks, shared by every coupled output of a group.

Zeroing a channel right after its normalisation is what removing it does downstream, so a
hard mask previews pruning without touching the weights (sensitivity analysis), and a soft
mask m_lc = sigmoid((k_l C_l - rank_lc - 0.5) / tau) lets the scoring network learn k_l.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from core.models.graph import PruningGraph


class ChannelMasks:
    def __init__(self, graph: PruningGraph, ranks: Mapping[str, np.ndarray]):
        """``ranks[name][c]`` is channel c's rank in its group (0 = most important)."""
        self.graph = graph
        self.ranks = {g.name: torch.as_tensor(np.asarray(ranks[g.name]), dtype=torch.float32) for g in graph.groups}
        self.masks: dict[str, torch.Tensor | None] = {g.name: None for g in graph.groups}
        self._hooks = []
        for g in graph.groups:
            for module_name, module_idxs, group_idxs in g.mask_modules:
                hook = self._hook(g.name, g.channels, module_idxs, group_idxs)
                self._hooks.append(graph.modules[module_name].register_forward_hook(hook))

    def _hook(self, name: str, channels: int, module_idxs: list[int], group_idxs: list[int]):
        identity = module_idxs == group_idxs == list(range(channels))
        module_index = torch.as_tensor(module_idxs, dtype=torch.long)
        group_index = torch.as_tensor(group_idxs, dtype=torch.long)

        def hook(_module, _inputs, output):
            mask = self.masks[name]
            if mask is None:
                return None
            mask = mask.to(output.device, output.dtype)
            if not identity:  # the module carries only some of the group's channels
                full = torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
                mask = full.index_put((module_index.to(output.device),), mask[group_index.to(output.device)])
            return output * mask.view(1, -1, 1, 1)
        return hook

    def set_soft(self, keep: torch.Tensor, tau: float) -> None:
        """keep: one ratio per group (in graph order), differentiable."""
        for g, k in zip(self.graph.groups, keep):
            self.masks[g.name] = torch.sigmoid((k.float() * g.channels - self.ranks[g.name] - 0.5) / tau)

    def set_hard(self, kept: Mapping[str, int]) -> None:
        """Keep the ``kept[name]`` best-ranked channels of the named groups; others untouched."""
        for g in self.graph.groups:
            self.masks[g.name] = (self.ranks[g.name] < kept[g.name]).float() if g.name in kept else None

    def clear(self) -> None:
        for name in self.masks:
            self.masks[name] = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> "ChannelMasks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """Rank of each channel, 0 for the highest score (stable for ties)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return ranks
