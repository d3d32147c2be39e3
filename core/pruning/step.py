"""One pruning step: score filters, allocate per-group amounts, cut for real.

Used by the prune-retrain loop, the dashboard's live preview and the tests, so that every
path prunes the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from core.allocation.base import Allocation, AllocationLimits, ProgressFn, cap_at_params
from core.allocation.baselines import allocate_by_sensitivity, allocate_global, allocate_uniform
from core.allocation.cost import CostModel
from core.allocation.masks import ranks_from_scores
from core.allocation.scoring_network import ScoringNetworkSettings, allocate_by_scoring_network
from core.importance.criteria import NEEDS_CORRELATION, ContributionImportance, make_importance
from core.importance.substitutability import DEFAULT_POSITIONS, correlations_from
from core.pruning.graph import PruningGraph, select_removal
from core.pruning.methods import MethodSpec

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepSettings:
    beta: float = 0.5
    positions_per_batch: int = DEFAULT_POSITIONS
    after_activation: bool = False
    correlation: str = "activations"  # a key of core.importance.substitutability.CORRELATION_SOURCES
    seed: int = 0
    # forward passes of the scoring network and the sensitivity measurement (a resolved name,
    # core.precision); correlations are always measured in fp32 (Pearson on bf16 responses
    # would lose the digits that tell near-duplicates apart)
    precision: str = "fp32"
    limits: AllocationLimits = field(default_factory=AllocationLimits)
    scoring: ScoringNetworkSettings = field(default_factory=ScoringNetworkSettings)


@dataclass
class GroupAnalysis:
    """What the step saw in one group: data for the dashboard's charts."""

    scores: dict[str, np.ndarray]  # criterion score per channel, by group
    correlations: dict[str, np.ndarray]  # signed correlation matrices (empty without data)


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


def example_input(model: nn.Module, input_size: Sequence[int], in_channels: int) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.zeros(1, in_channels, int(input_size[0]), int(input_size[1]), device=device)


def score_filters(model: nn.Module, graph: PruningGraph, criterion: str, batches: Sequence[Batch],
                  settings: StepSettings) -> GroupAnalysis:
    correlations: dict[str, np.ndarray] = {}
    if criterion in NEEDS_CORRELATION:
        correlations = correlations_from(
            settings.correlation, model, graph, (x for x, _ in batches),
            positions_per_batch=settings.positions_per_batch, after_activation=settings.after_activation,
            seed=settings.seed)
    importance = make_importance(criterion, model, correlations, settings.beta, settings.seed)
    fallback = ContributionImportance()
    scores = {}
    for g in graph.groups:
        tp_group = graph.tp_group(g, range(g.channels))
        value = importance(tp_group)
        if value is None:  # e.g. BN scale in a group without BatchNorm: fall back to L1
            value = fallback(tp_group)
        scores[g.name] = value.detach().cpu().double().numpy()
    return GroupAnalysis(scores=scores, correlations=correlations)


def allocate(model: nn.Module, graph: PruningGraph, cost: CostModel, allocator: str, analysis: GroupAnalysis,
             batches: Sequence[Batch], target_reduction: float, class_names: Sequence[str],
             class_weights: Sequence[float], settings: StepSettings, progress: ProgressFn | None = None) -> Allocation:
    ranks = {name: ranks_from_scores(s) for name, s in analysis.scores.items()}
    if allocator == "uniform":
        return allocate_uniform(graph, cost, target_reduction, settings.limits)
    if allocator == "global":
        return allocate_global(graph, cost, analysis.scores, target_reduction, settings.limits)
    if allocator == "sensitivity":
        return allocate_by_sensitivity(model, graph, cost, ranks, batches, target_reduction, class_weights,
                                       settings.limits, progress=progress, precision=settings.precision)
    return allocate_by_scoring_network(model, graph, cost, ranks, batches, target_reduction, class_names,
                                       class_weights, settings.scoring, settings.limits, progress=progress,
                                       precision=settings.precision)


@dataclass
class PruningContext:
    """Everything one pruning step reads, built once per step (`pruning_context`): the model,
    its current graph and cost model, the calibration batches and the classes. The graph goes
    stale once the model is cut: the next step builds a new context."""

    model: nn.Module
    graph: PruningGraph
    cost: CostModel
    batches: Sequence[Batch]
    class_names: list[str]
    class_weights: list[float]
    input_size: tuple[int, int]
    in_channels: int
    settings: StepSettings


def pruning_context(model: nn.Module, input_size: Sequence[int], in_channels: int, batches: Sequence[Batch],
                    class_names: Sequence[str], class_weights: Sequence[float] | None = None,
                    settings: StepSettings | None = None) -> PruningContext:
    """The context of one step on ``model`` as it is now (graph traced at ``input_size``);
    class weights default to 1 per class."""
    size = (int(input_size[0]), int(input_size[1]))
    graph = PruningGraph(model, example_input(model, size, in_channels))
    weights = list(class_weights) if class_weights is not None else [1.0] * len(class_names)
    return PruningContext(model=model, graph=graph, cost=CostModel(graph), batches=batches,
                          class_names=list(class_names), class_weights=weights, input_size=size,
                          in_channels=int(in_channels), settings=settings or StepSettings())


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


def plan_step(context: PruningContext, method: MethodSpec, target_reduction: float,
              progress: ProgressFn | None = None, params_floor: float | None = None,
              on_phase: PhaseFn | None = None) -> StepPlan:
    """Score the filters, allocate ``target_reduction`` of the current MACs (never below
    ``params_floor`` parameters when given: a parameter target scales the cut back) and select
    the channels to remove, without cutting. ``progress`` follows the allocation."""
    if on_phase is not None:
        on_phase(f"scoring filters ({method.criterion})")
    analysis = score_filters(context.model, context.graph, method.criterion, context.batches, context.settings)
    if on_phase is not None:
        on_phase(f"allocating ({method.allocator})")
    allocation = allocate(context.model, context.graph, context.cost, method.allocator, analysis, context.batches,
                          target_reduction, context.class_names, context.class_weights, context.settings, progress)
    if params_floor is not None:
        allocation = cap_at_params(context.cost, context.graph, allocation, params_floor, context.settings.limits)
    removed = {g.name: select_removal(g, analysis.scores[g.name].tolist(), g.channels - allocation.kept[g.name])
               for g in context.graph.groups}
    return StepPlan(analysis=analysis, allocation=allocation, removed=removed, graph=context.graph)


def prune_step(
    model: nn.Module,
    input_size: Sequence[int],
    in_channels: int,
    method: MethodSpec,
    target_reduction: float,
    batches: Sequence[Batch],
    class_names: Sequence[str],
    class_weights: Sequence[float] | None = None,
    settings: StepSettings | None = None,
    progress: ProgressFn | None = None,
    params_floor: float | None = None,
) -> StepResult:
    """Remove ``target_reduction`` of the model's current MACs, in place: `plan_step`, then the cut."""
    context = pruning_context(model, input_size, in_channels, batches, class_names, class_weights, settings)
    plan = plan_step(context, method, target_reduction, progress=progress, params_floor=params_floor)
    history = plan.graph.prune(plan.removed)
    return StepResult(allocation=plan.allocation, removed=plan.removed, history=history, analysis=plan.analysis)


def pruned_copy(model: nn.Module, input_size: Sequence[int], in_channels: int, kept: dict[str, int]) -> nn.Module:
    """A copy of ``model`` cut to ``kept`` channels per group by group L1 (no fine-tuning): the
    dashboard's live preview of an allocation. The original is untouched."""
    import copy

    clone = copy.deepcopy(model).eval()
    graph = PruningGraph(clone, example_input(clone, input_size, in_channels))
    importance = ContributionImportance()
    removals = {}
    for g in graph.groups:
        count = g.channels - int(kept.get(g.name, g.channels))
        if count > 0:
            scores = importance.contribution(graph.tp_group(g, range(g.channels)))
            removals[g.name] = select_removal(g, scores.tolist(), count)
    graph.prune(removals)
    return clone
