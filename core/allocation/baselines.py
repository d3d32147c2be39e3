"""Baseline allocators with the scoring network's interface (`Allocator`).

- uniform: one keep ratio for every group, the one that meets the MACs budget.
- global ranking: Torch-Pruning's global pruning over normalised scores (each channel's
  score divided by its group's mean, as Torch-Pruning's 'mean' normaliser does), with the
  global threshold set by bisection so the MACs budget is met (Torch-Pruning's own pruner
  counts channels, not MACs).
- sensitivity analysis: prune each group alone to a few ratios (hard masks, no copy),
  measure the calibration-loss rise, then cut greedily where a MACs saving costs least.
  METHOD.md measures the validation drop instead; this uses the class-balanced loss on the
  calibration images (a few seconds per curve point) because a validation mIoU per group and
  level (88 evaluations for a 22-group Unet) would cost minutes per round on a CPU. Labelled
  as such in the README.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from core.progress import StageProgress
from core.allocation.base import (
    Allocation, AllocationLimits, counts_for, fill_budget, finish, meet_budget,
)
from core.allocation.context import Allocator, PruningContext, StoredResults, require
from core.allocation.cost import CostModel
from core.allocation.masks import ChannelMasks, ranks_from_scores
from core.errors import DefectPruneError
from core.importance.scoring import GroupAnalysis
from core.models.graph import PruningGraph
from core.models.runtime import eval_mode, model_device
from core.precision import autocast
from core.train import SegmentationLoss

SENSITIVITY_LEVELS = (0.3, 0.5, 0.7, 0.9)


class SensitivityCurveError(DefectPruneError):
    """Stored sensitivity curves do not belong to the model they are applied to."""


def allocate_uniform(graph: PruningGraph, cost: CostModel, target_reduction: float,
                     limits: AllocationLimits | None = None) -> Allocation:
    limits = limits or AllocationLimits()
    target = cost.budget0 * (1.0 - target_reduction)
    n = len(graph.groups)
    ratio, kept, met = meet_budget(cost, lambda r: counts_for(graph, np.full(n, r), limits), target, 0.0, 1.0)
    keep = np.full(n, ratio)
    if met:
        kept = fill_budget(cost, graph, kept, {g.name: ratio * g.channels for g in graph.groups}, target, limits)
    return finish("uniform", graph, cost, kept, keep, {g.name: ratio for g in graph.groups}, met)


def allocate_global(graph: PruningGraph, cost: CostModel, scores: Mapping[str, np.ndarray],
                    target_reduction: float, limits: AllocationLimits | None = None) -> Allocation:
    limits = limits or AllocationLimits()
    # Ties (an untrained net's BN scales are all 1) are broken by the channel's rank in its
    # group, so that tied groups shrink alike instead of all or nothing.
    normalised = {}
    for name, s in scores.items():
        s = np.asarray(s, np.float64)
        rank = np.argsort(np.argsort(-s, kind="stable"), kind="stable")
        normalised[name] = s / max(float(np.mean(np.abs(s))), 1e-12) + 1e-6 * (1.0 - rank / s.size)
    top = max(float(s.max()) for s in normalised.values()) + 1e-9

    def counts_at(level: float) -> dict[str, int]:
        # level in [0, 1]: the threshold falls as the level rises, so counts grow with it
        threshold = top * (1.0 - level)
        keep = np.array([(normalised[g.name] >= threshold).mean() for g in graph.groups])
        return counts_for(graph, keep, limits)

    target = cost.budget0 * (1.0 - target_reduction)
    level, kept, met = meet_budget(cost, counts_at, target, 0.0, 1.0)
    keep = np.array([kept[g.name] / g.channels for g in graph.groups])
    mean_score = {g.name: float(np.mean(normalised[g.name] >= top * (1.0 - level))) for g in graph.groups}
    return finish("global", graph, cost, kept, keep, mean_score, met)


@torch.no_grad()
def allocate_by_sensitivity(context: PruningContext, analysis: GroupAnalysis, target_reduction: float,
                            progress: StageProgress | None = None,
                            levels: Sequence[float] = SENSITIVITY_LEVELS) -> Allocation:
    """Prune each group alone at each of ``levels`` (masks over the channels ranked by the
    analysis' scores, nothing cut) and record the rise of the class-balanced loss on the
    calibration batches (forward passes in the settings' precision); allocate greedily from
    those curves to meet the budget."""
    model, graph, batches = context.model, context.graph, context.batches
    limits, precision = context.settings.limits, context.settings.precision
    ranks = {name: ranks_from_scores(s) for name, s in analysis.scores.items()}
    loss_fn = SegmentationLoss(torch.as_tensor(context.class_weights, dtype=torch.float32))
    device = model_device(model)

    def calibration_loss() -> float:
        with autocast(device, precision):
            outputs = [(model(x.to(device)), y) for x, y in batches]
        return float(np.mean([float(loss_fn.to(device)(out, y.to(device))) for out, y in outputs]))

    level_counts = sensitivity_level_counts(graph, limits, levels)
    drops: dict[str, list[float]] = {}
    with eval_mode(model), ChannelMasks(graph, ranks) as masks:
        base = calibration_loss()
        total = len(graph.groups) * len(levels)
        stop = False
        for gi, g in enumerate(graph.groups):
            drops[g.name] = [0.0]
            for li, count in enumerate(level_counts[g.name][1:]):
                masks.set_hard({g.name: count})
                drops[g.name].append(calibration_loss() - base)
                if progress is not None and progress((gi * len(levels) + li + 1) / total, f"sensitivity of {g.name}"):
                    stop = True  # a stop ends the measuring; unmeasured groups are not cut
                    break
            masks.clear()
            if stop:
                break
    return allocation_from_drops(graph, context.cost, drops, target_reduction, limits, levels)


def sensitivity_level_counts(graph: PruningGraph, limits: AllocationLimits,
                             levels: Sequence[float] = SENSITIVITY_LEVELS) -> dict[str, list[int]]:
    """Per group, the channels kept unpruned and at each sensitivity level, within the limits."""
    return {g.name: [g.channels] + [limits.kept(g, 1.0 - lv) for lv in levels] for g in graph.groups}


def allocation_from_drops(
    graph: PruningGraph, cost: CostModel, drops: Mapping[str, Sequence[float]], target_reduction: float,
    limits: AllocationLimits | None = None, levels: Sequence[float] = SENSITIVITY_LEVELS,
) -> Allocation:
    """Meet a MACs budget from measured sensitivity curves (per group, the calibration-loss
    rise at no pruning and at each of ``levels``): cut greedily where a MACs saving costs the
    least loss, then take from the last cut only what the budget needs. Separate from the
    measuring so that stored curves answer any target in milliseconds (the dashboard's live
    tuning). A group without a curve (or with a short one, from a stopped measurement) is cut
    no further than its curve reaches."""
    limits = limits or AllocationLimits()
    unknown = sorted(set(drops) - set(graph.by_name))
    if unknown:
        raise SensitivityCurveError(f"the sensitivity curves name groups this model does not have "
                                    f"({', '.join(unknown[:3])}); they were measured on another model: measure again")
    level_counts = sensitivity_level_counts(graph, limits, levels)
    curves = {g.name: [float(d) for d in drops.get(g.name, [0.0])] for g in graph.groups}
    target = cost.budget0 * (1.0 - target_reduction)
    state = {g.name: 0 for g in graph.groups}
    current = {g.name: g.channels for g in graph.groups}
    met = cost.budget_of(current) <= target
    while not met:
        best, best_rate = None, np.inf
        now = cost.budget_of(current)
        for g in graph.groups:
            i = state[g.name]
            if i + 1 >= len(level_counts[g.name]) or len(curves[g.name]) <= i + 1:
                continue
            trial = dict(current, **{g.name: level_counts[g.name][i + 1]})
            saved = now - cost.budget_of(trial)
            if saved <= 0:
                continue
            rate = max(curves[g.name][i + 1] - curves[g.name][i], 0.0) / saved
            if rate < best_rate:
                best, best_rate = g.name, rate
        if best is None:
            break
        previous = current[best]
        state[best] += 1
        current[best] = level_counts[best][state[best]]
        if cost.budget_of(current) <= target:
            # the last move overshoots: take only as many channels from it as the budget needs
            lo, hi = current[best], previous
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if cost.budget_of(dict(current, **{best: mid})) <= target:
                    lo = mid
                else:
                    hi = mid
            current[best] = lo
            met = True
    keep = np.array([current[g.name] / g.channels for g in graph.groups])
    importance = {g.name: float(np.mean(curves[g.name])) for g in graph.groups}
    return finish("sensitivity", graph, cost, current, keep, importance, met,
                  details={"drops": curves, "levels": [float(lv) for lv in levels]})


class UniformAllocator(Allocator):
    label = "uniform"

    def allocate(self, context: PruningContext, analysis: GroupAnalysis, target_reduction: float,
                 progress: StageProgress | None = None) -> Allocation:
        return allocate_uniform(context.graph, context.cost, target_reduction, context.settings.limits)

    def recreate(self, graph: PruningGraph, cost: CostModel, target_reduction: float, stored: StoredResults,
                 limits: AllocationLimits | None = None) -> Allocation:
        return allocate_uniform(graph, cost, target_reduction, limits)


class GlobalAllocator(Allocator):
    label = "global (L1)"
    needs = ("l1_scores",)

    def allocate(self, context: PruningContext, analysis: GroupAnalysis, target_reduction: float,
                 progress: StageProgress | None = None) -> Allocation:
        return allocate_global(context.graph, context.cost, analysis.scores, target_reduction, context.settings.limits)

    def recreate(self, graph: PruningGraph, cost: CostModel, target_reduction: float, stored: StoredResults,
                 limits: AllocationLimits | None = None) -> Allocation:
        scores = require(stored.l1_scores, "global", "L1 scores")
        return allocate_global(graph, cost, scores, target_reduction, limits)


class SensitivityAllocator(Allocator):
    label = "sensitivity"
    needs = ("drops",)

    def allocate(self, context: PruningContext, analysis: GroupAnalysis, target_reduction: float,
                 progress: StageProgress | None = None) -> Allocation:
        return allocate_by_sensitivity(context, analysis, target_reduction, progress=progress)

    def recreate(self, graph: PruningGraph, cost: CostModel, target_reduction: float, stored: StoredResults,
                 limits: AllocationLimits | None = None) -> Allocation:
        drops = require(stored.drops, "sensitivity", "measured sensitivity curves")
        levels = SENSITIVITY_LEVELS if stored.levels is None else stored.levels
        return allocation_from_drops(graph, cost, drops, target_reduction, limits, levels)
