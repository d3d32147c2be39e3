"""What every allocator returns, and meeting a cost budget (MACs, or milliseconds from a latency
table: the cost model's ``budget``) exactly on rounded channel counts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.allocation.cost import CostModel
from core.models.graph import PrunableGroup, PruningGraph, kept_count



@dataclass
class AllocationLimits:
    max_prune_ratio: float = 0.9  # no group loses more than this share of its channels
    min_channels: int = 2  # nor goes below this many
    round_to: int = 1  # kept counts as multiples of this (hardware-friendly widths)
    # keep whole the groups the classifier conv reads: on NEU-Seg the scoring network cut that
    # full-resolution group to 2 of 16 channels, and no fine-tuning recovered it
    # (bench/results/neu_allocation_check.md)
    protect_head_input: bool = True

    def protected(self, group: PrunableGroup) -> bool:
        return self.protect_head_input and group.feeds_classifier

    def kept(self, group: PrunableGroup, keep_ratio: float) -> int:
        """Channels a group keeps at a continuous keep ratio, within every limit."""
        if self.protected(group):
            return group.channels
        return kept_count(group.channels, keep_ratio, step=max(group.channel_step, self.round_to),
                          min_channels=self.min_channels, max_prune_ratio=self.max_prune_ratio)


@dataclass
class Allocation:
    allocator: str
    kept: dict[str, int]  # channels kept per group
    channels: dict[str, int]  # channels before
    keep_ratio: dict[str, float]  # continuous keep ratio before rounding
    group_importance: dict[str, float]
    scale_importance: dict[int, float]
    predicted: dict[str, float]  # macs, params, macs_reduction, params_reduction
    budget_met: bool = True
    class_importance: dict[str, dict[str, float]] | None = None  # group -> defect class -> value
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def pruning_ratio(self) -> dict[str, float]:
        return {n: 1.0 - self.kept[n] / self.channels[n] for n in self.kept}

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocator": self.allocator, "kept": self.kept, "channels": self.channels,
            "keep_ratio": self.keep_ratio, "pruning_ratio": self.pruning_ratio,
            "group_importance": self.group_importance,
            "scale_importance": {str(k): v for k, v in self.scale_importance.items()},
            "predicted": self.predicted, "budget_met": self.budget_met,
            "class_importance": self.class_importance,
        }


def counts_for(graph: PruningGraph, keep: np.ndarray, limits: AllocationLimits) -> dict[str, int]:
    return {g.name: limits.kept(g, float(k)) for g, k in zip(graph.groups, keep)}


def meet_budget(
    cost: CostModel,
    counts_at: Callable[[float], dict[str, int]],
    target_macs: float,
    low: float,
    high: float,
    iterations: int = 60,
) -> tuple[float, dict[str, int], bool]:
    """Bisection on a parameter whose counts grow with it: the largest parameter whose
    rounded counts stay within ``target_macs`` (the cost model's budget: MACs or ms).
    Returns (parameter, counts, met)."""
    low_counts = counts_at(low)
    if cost.budget_of(low_counts) > target_macs:
        return low, low_counts, False  # the per-group limits forbid going this low
    best = (low, low_counts)
    for _ in range(iterations):
        mid = (low + high) / 2
        counts = counts_at(mid)
        if cost.budget_of(counts) <= target_macs:
            low, best = mid, (mid, counts)
        else:
            high = mid
    return best[0], best[1], True


def cap_at_params(cost: CostModel, graph: PruningGraph, allocation: Allocation, params_floor: float,
                  limits: AllocationLimits, iterations: int = 40) -> Allocation:
    """Stop an allocation at a parameter budget: a MACs-budgeted allocation that would leave
    fewer than ``params_floor`` parameters is scaled back, every group's cut shrunk by the same
    factor t (its shape kept), to the smallest t that still reaches the floor. Bisection on t
    over the predictor; the allocation itself where it stays above the floor."""
    if cost.predict(allocation.kept)["params"] >= params_floor:
        return allocation
    cut = {g.name: 1.0 - allocation.kept[g.name] / g.channels for g in graph.groups}

    def kept_at(t: float) -> dict[str, int]:
        return {g.name: min(limits.kept(g, 1.0 - t * cut[g.name]), g.channels) for g in graph.groups}

    low, high = 0.0, 1.0  # params(low) >= floor > params(high)
    for _ in range(iterations):
        mid = (low + high) / 2
        if cost.predict(kept_at(mid))["params"] > params_floor:
            low = mid
        else:
            high = mid
    kept = kept_at(high)
    keep_ratio = {name: 1.0 - high * (1.0 - ratio) for name, ratio in allocation.keep_ratio.items()}
    return replace(allocation, kept=kept, keep_ratio=keep_ratio, predicted=cost.predict(kept),
                   details={**allocation.details, "capped_at_params": float(params_floor), "cut_scale": high})


def fill_budget(
    cost: CostModel, graph: PruningGraph, kept: dict[str, int], desired: Mapping[str, float],
    target_macs: float, limits: AllocationLimits,
) -> dict[str, int]:
    """Spend what rounding left of the budget: give channels back, one channel step at a time,
    to the group furthest below its desired (continuous) count, while the MACs still fit.
    Matters where steps are coarse (GroupNorm's 32 groups in FPN)."""
    kept = dict(kept)
    open_groups = {g.name for g in graph.groups}
    while open_groups:
        def deficit(name: str) -> float:
            return (desired[name] - kept[name]) / graph.by_name[name].channels
        name = max(sorted(open_groups), key=deficit)
        g = graph.by_name[name]
        grown = kept[name] + max(g.channel_step, limits.round_to)
        if grown > g.channels or cost.budget_of({**kept, name: grown}) > target_macs:
            open_groups.discard(name)
            continue
        kept[name] = grown
    return kept


def scale_importance(graph: PruningGraph, cost: CostModel, values: Mapping[str, float]) -> dict[int, float]:
    """MACs-weighted mean of a per-group value over the groups of each scale."""
    weights = cost.group_macs()
    sums: dict[int, float] = {}
    totals: dict[int, float] = {}
    for g in graph.groups:
        w = float(weights[g.index])
        sums[g.scale] = sums.get(g.scale, 0.0) + w * values[g.name]
        totals[g.scale] = totals.get(g.scale, 0.0) + w
    return {s: sums[s] / totals[s] if totals[s] > 0 else 0.0 for s in sorted(sums)}


def finish(
    allocator: str, graph: PruningGraph, cost: CostModel, kept: dict[str, int], keep: np.ndarray,
    importance: Mapping[str, float], met: bool, **extra: Any,
) -> Allocation:
    return Allocation(
        allocator=allocator, kept=kept, channels={g.name: g.channels for g in graph.groups},
        keep_ratio={g.name: float(k) for g, k in zip(graph.groups, keep)},
        group_importance=dict(importance), scale_importance=scale_importance(graph, cost, importance),
        predicted=cost.predict(kept), budget_met=met, **extra,
    )
