"""MACs and parameters as a closed-form, differentiable function of per-group keep ratios.

For every conv, MACs = MACs_0 x (share of its input channels kept) x (share of its output
channels kept); a conv's input may be fed by several groups (concatenated skips) and by
channels no group owns (the image). Depthwise convs scale once with their group. Norm layers
scale with their group. Everything else (activations, pooling, upsampling) scales with the
convs' overall ratio, which is exact enough: it is about 1% of a U-Net's MACs.
Torch-Pruning's own counter gives the per-layer numbers at full size, so the prediction at
keep ratio 1 is Torch-Pruning's count exactly, and after real pruning it stays within 2%.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch_pruning as tp

from core.models.graph import CONV_TYPES, PruningGraph
from core.models.runtime import eval_mode
from core.profile import subclass_counters


class CostModel:
    """The closed-form MACs model. Every allocator spends its budget through ``budget0``,
    ``budget`` (differentiable, from keep ratios) and ``budget_of`` (from kept counts), so a
    model of another cost (`core.allocation.latency.LatencyCostModel`: milliseconds from a
    measured table) drops in with the same interface; ``kind`` names the cost budgeted."""

    kind = "macs"

    def __init__(self, graph: PruningGraph):
        model = graph.model
        example = graph.example_inputs
        with eval_mode(model), subclass_counters(model), contextlib.redirect_stdout(sys.stderr):
            self.macs0, self.params0, layer_macs, layer_params = tp.utils.count_ops_and_params(
                model, example, layer_wise=True)
        self.graph = graph
        out_owner: dict[str, int] = {}
        in_parts: dict[str, list[tuple[int, int]]] = {}
        for g in graph.groups:
            for name in g.out_modules:
                out_owner.setdefault(name, g.index)
            for name, n in g.in_convs:
                in_parts.setdefault(name, []).append((g.index, n))
        n_groups = len(graph.groups)
        conv_base, conv_params, out_idx, fixed, composition = [], [], [], [], []
        norm_base, norm_params, norm_idx = [], [], []
        other_macs = other_params = 0.0
        for name, module in model.named_modules():
            macs = float(layer_macs.get(module) or 0.0)
            params = float(layer_params.get(module) or 0.0)
            if isinstance(module, CONV_TYPES):
                row = torch.zeros(n_groups)
                depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
                owner = out_owner.get(name, -1)
                if depthwise:
                    # input and output channels are the same channels: scale once
                    owner = owner if owner >= 0 else next((gi for gi, _ in in_parts.get(name, [])), -1)
                    fixed.append(1.0)
                else:
                    fed = 0
                    for gi, n in in_parts.get(name, []):
                        row[gi] += n / module.in_channels
                        fed += n
                    fixed.append(max(0.0, 1.0 - fed / module.in_channels))
                composition.append(row)
                out_idx.append(owner if owner >= 0 else n_groups)
                conv_base.append(macs)
                conv_params.append(params)
            elif name in out_owner and isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                norm_idx.append(out_owner[name])
                norm_base.append(macs)
                norm_params.append(params)
            elif not list(module.children()):
                other_macs += macs
                other_params += params
        self._conv_base = torch.tensor(conv_base, dtype=torch.float64)
        self._conv_params = torch.tensor(conv_params, dtype=torch.float64)
        self._out_idx = torch.tensor(out_idx, dtype=torch.long)
        self._fixed = torch.tensor(fixed, dtype=torch.float64)
        self._composition = (torch.stack(composition) if composition else torch.zeros(0, n_groups)).double()
        self._norm_base = torch.tensor(norm_base, dtype=torch.float64)
        self._norm_params = torch.tensor(norm_params, dtype=torch.float64)
        self._norm_idx = torch.tensor(norm_idx, dtype=torch.long)
        self._other_macs = other_macs
        self._other_params = other_params
        self.group_names = [g.name for g in graph.groups]
        self.channels = torch.tensor([g.channels for g in graph.groups], dtype=torch.float64)

    # ------------------------------------------------------------ closed form
    def _terms(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = keep.to(torch.float64)
        extended = torch.cat([keep, keep.new_ones(1)])
        in_frac = self._fixed + self._composition @ keep
        out_frac = extended[self._out_idx]
        conv_factor = in_frac * out_frac
        norm_factor = extended[self._norm_idx]
        return conv_factor, norm_factor

    def macs(self, keep: torch.Tensor) -> torch.Tensor:
        """Predicted MACs for keep ratios (one per group, differentiable)."""
        conv_factor, norm_factor = self._terms(keep)
        conv = (self._conv_base * conv_factor).sum()
        conv_ratio = conv / self._conv_base.sum().clamp_min(1.0)
        return conv + (self._norm_base * norm_factor).sum() + self._other_macs * conv_ratio

    def params(self, keep: torch.Tensor) -> torch.Tensor:
        conv_factor, norm_factor = self._terms(keep)
        return (self._conv_params * conv_factor).sum() + (self._norm_params * norm_factor).sum() + self._other_params

    def group_macs(self) -> torch.Tensor:
        """MACs each group touches (its convs' outputs and inputs): the weight of a group in
        per-scale summaries."""
        owned = torch.zeros(len(self.group_names), dtype=torch.float64)
        has_owner = self._out_idx < len(self.group_names)
        owned.index_add_(0, self._out_idx[has_owner], self._conv_base[has_owner])
        return owned + self._composition.T @ self._conv_base

    # ------------------------------------------------------------ the budgeted cost
    @property
    def budget0(self) -> float:
        """The budgeted cost of the model as it is (nothing cut)."""
        return float(self.macs0)

    def budget(self, keep: torch.Tensor) -> torch.Tensor:
        """The budgeted cost at keep ratios (one per group, differentiable)."""
        return self.macs(keep)

    def budget_of(self, kept: Mapping[str, int] | None = None) -> float:
        """The budgeted cost for kept channel counts per group (the allocators' searches ask
        this tens of times an answer: the budget alone, not the whole `predict`)."""
        return float(self.budget(self.keep_vector(kept)))

    # ------------------------------------------------------------ convenience
    def keep_vector(self, kept: Mapping[str, int] | None = None) -> torch.Tensor:
        """Keep ratios from kept channel counts per group name (missing groups: all kept)."""
        kept = kept or {}
        counts = torch.tensor([float(kept.get(n, c)) for n, c in zip(self.group_names, self.channels.tolist())],
                              dtype=torch.float64)
        return counts / self.channels

    def predict(self, kept: Mapping[str, int] | None = None) -> dict[str, float]:
        """MACs, parameters and their reductions (fractions) for kept channel counts."""
        keep = self.keep_vector(kept)
        macs = float(self.macs(keep))
        params = float(self.params(keep))
        return {
            "macs": macs, "params": params,
            "macs_reduction": 1.0 - macs / self.macs0, "params_reduction": 1.0 - params / self.params0,
        }
