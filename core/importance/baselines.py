"""Baseline criteria: filters nearest the geometric median (FPGM), BatchNorm scales (network
slimming), and seeded random filters (a sanity floor)."""

from __future__ import annotations

import torch
import torch_pruning as tp

from core.importance.magnitude import WholeGroupReduce


class FPGMImportance(WholeGroupReduce, tp.importance.FPGMImportance):
    pass


class BNScaleImportance(WholeGroupReduce, tp.importance.BNScaleImportance):
    pass


class SeededRandomImportance(tp.importance.Importance):
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator, dtype=torch.float64)
