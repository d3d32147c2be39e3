"""One pruning step: score filters, allocate per-group amounts, select, cut for real.

Used by the prune-retrain loop, the score job, the dashboard's live preview and the tests, so
that every path prunes the same way. `plan_step` stops before the cut (what the score job
shows); `prune_step` is the plan, then the cut."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.nn as nn

from core.progress import StageProgress
from core.allocation.base import Allocation, cap_at_params
# the step's callers (the score and prune services) build their context and settings from here;
# both are defined with the allocators, the lowest layer that reads them
from core.allocation.context import PruningContext, StepSettings, pruning_context
from core.allocation.registry import ALLOCATORS
from core.importance.magnitude import ContributionImportance
from core.importance.scoring import GroupAnalysis, score_filters
from core.models.graph import PruningGraph, select_removal
from core.pruning.methods import MethodSpec

__all__ = ["LIVE_DETAILS", "PruningContext", "StepPlan", "StepResult", "StepSettings", "analyse",
           "plan_step", "prune_step", "pruned_copy", "pruning_context"]


@dataclass
class StepResult:
    allocation: Allocation
    removed: dict[str, list[int]]
    history: list  # Torch-Pruning history entries of this step
    analysis: GroupAnalysis

    def summary(self) -> dict[str, Any]:
        """Small, JSON-ready description of the step for the run record."""
        removed = sum(len(v) for v in self.removed.values())
        total = sum(self.allocation.channels.values())
        return {
            "allocation": self.allocation.to_dict(),
            "channels_removed": removed, "channels_before": total,
            "scores": {name: {"min": float(s.min()), "mean": float(s.mean()), "max": float(s.max())}
                       for name, s in self.analysis.scores.items()},
        }


# what a dashboard's live tuning needs to answer any target without measuring again: the
# scoring network's logits, or the sensitivity curves (per-group loss rise per level)
LIVE_DETAILS = ("history", "offset", "logits", "drops", "levels")


@dataclass
class StepPlan:
    """A step scored, allocated and selected, nothing cut: what would go, and why."""

    analysis: GroupAnalysis
    allocation: Allocation
    removed: dict[str, list[int]]  # channel indices per group
    graph: PruningGraph

    def group_records(self) -> list[dict[str, Any]]:
        """Per group, in network order: what the dashboard draws (JSON-ready)."""
        return [{"name": g.name, "index": g.index, "channels": g.channels, "kept": self.allocation.kept[g.name],
                 "scale": g.scale, "role": g.role, "scores": [float(s) for s in self.analysis.scores[g.name]],
                 "removed": sorted(int(i) for i in self.removed[g.name])}
                for g in self.graph.groups]

    def live_details(self) -> dict[str, Any]:
        return {k: v for k, v in self.allocation.details.items() if k in LIVE_DETAILS}

    def correlation_arrays(self) -> dict[str, np.ndarray]:
        """The measured correlation matrices as float32, keyed ``group_NNN`` by network order
        (empty when the criterion reads none)."""
        return {f"group_{i:03d}": np.asarray(self.analysis.correlations[g.name], dtype=np.float32)
                for i, g in enumerate(self.graph.groups) if g.name in self.analysis.correlations}


PhaseFn = Callable[[str], None]  # told "scoring filters (l1)", "allocating (uniform)" as each phase starts


def analyse(context: PruningContext, criterion: str) -> GroupAnalysis:
    """The context's groups scored by ``criterion`` with the step's settings."""
    settings = context.settings
    return score_filters(context.model, context.graph, criterion, (x for x, _ in context.batches),
                         beta=settings.beta, seed=settings.seed, correlation=settings.correlation,
                         positions_per_batch=settings.positions_per_batch,
                         after_activation=settings.after_activation)


def plan_step(context: PruningContext, method: MethodSpec, target_reduction: float,
              progress: StageProgress | None = None, params_floor: float | None = None,
              on_phase: PhaseFn | None = None) -> StepPlan:
    """Score the filters, allocate ``target_reduction`` of the current MACs (never below
    ``params_floor`` parameters when given: a parameter target scales the cut back) and select
    the channels to remove, without cutting. ``progress`` follows the allocation."""
    if on_phase is not None:
        on_phase(f"scoring filters ({method.criterion})")
    analysis = analyse(context, method.criterion)
    if on_phase is not None:
        on_phase(f"allocating ({method.allocator})")
    allocation = ALLOCATORS[method.allocator].allocate(context, analysis, target_reduction, progress)
    if params_floor is not None:
        allocation = cap_at_params(context.cost, context.graph, allocation, params_floor, context.settings.limits)
    removed = {g.name: select_removal(g, analysis.scores[g.name].tolist(), g.channels - allocation.kept[g.name])
               for g in context.graph.groups}
    return StepPlan(analysis=analysis, allocation=allocation, removed=removed, graph=context.graph)


def prune_step(context: PruningContext, method: MethodSpec, target_reduction: float,
               progress: StageProgress | None = None, params_floor: float | None = None) -> StepResult:
    """Remove ``target_reduction`` of the model's current MACs, in place: `plan_step`, then the
    cut (the context's graph is stale afterwards)."""
    plan = plan_step(context, method, target_reduction, progress=progress, params_floor=params_floor)
    history = plan.graph.prune(plan.removed)
    return StepResult(allocation=plan.allocation, removed=plan.removed, history=history, analysis=plan.analysis)


def pruned_copy(model: nn.Module, input_size: Sequence[int], in_channels: int, kept: dict[str, int]) -> nn.Module:
    """A copy of ``model`` cut to ``kept`` channels per group by group L1 (no fine-tuning): the
    dashboard's live preview of an allocation. The original is untouched."""
    clone = copy.deepcopy(model).eval()
    graph = PruningGraph.traced(clone, input_size, in_channels)
    importance = ContributionImportance()
    removals = {}
    for g in graph.groups:
        count = g.channels - int(kept.get(g.name, g.channels))
        if count > 0:
            scores = importance.contribution(graph.tp_group(g, range(g.channels)))
            removals[g.name] = select_removal(g, scores.tolist(), count)
    graph.prune(removals)
    return clone
