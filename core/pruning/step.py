"""One pruning step: score filters, allocate per-group amounts, select, cut for real.

Used by the prune-retrain loop, the score job, the dashboard's live preview and the tests, so
that every path prunes the same way. `plan_step` stops before the cut (what the score job
shows); `prune_step` is the plan, then the cut."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from core.progress import StageProgress
from core.allocation.base import Allocation, cap_at_params, finish
# the step's callers (the score and prune services) build their context and settings from here;
# both are defined with the allocators, the lowest layer that reads them
from core.allocation.context import PruningContext, StepSettings, pruning_context
from core.allocation.registry import ALLOCATORS
from core.importance.magnitude import ContributionImportance
from core.importance.scoring import GroupAnalysis, score_filters
from core.errors import DefectPruneError
from core.models.graph import PruningGraph, select_removal
from core.pruning.methods import MethodSpec

__all__ = ["LIVE_DETAILS", "AllocationFileError", "FixedAllocation", "PruningContext", "StepPlan", "StepResult",
           "StepSettings", "analyse", "cut_as_decided", "plan_step", "prune_step", "prune_to", "pruned_copy", "pruning_context"]


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


class AllocationFileError(DefectPruneError):
    """An allocation file that cannot be read, or was made for another model."""


FIXED = "fixed"  # the allocator name a fixed allocation's round records


@dataclass(frozen=True)
class FixedAllocation:
    """Per-group kept channel counts tuned on the Layer importance page, for the model it was
    made for (``channels``: that model's counts), with the allocator and target it came from
    and the counts typed over the allocator's (``overrides``). A prune run's first round cuts
    exactly ``kept``; the file is this as JSON (`to_json`, `read`)."""

    kept: dict[str, int]
    channels: dict[str, int]
    allocator: str
    target: float
    checkpoint: str = ""
    overrides: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "allocator": self.allocator, "target": self.target,
                "kept": dict(self.kept), "channels": dict(self.channels), "overrides": dict(self.overrides)}

    @classmethod
    def from_json(cls, payload: Any, source: str) -> FixedAllocation:
        bad = f"{source} is not an allocation file ({{}}); write one with the Layer importance page"
        if not isinstance(payload, dict):
            raise AllocationFileError(bad.format("not a JSON object"))
        counts = {}
        for key in ("kept", "channels"):
            value = payload.get(key)
            if not isinstance(value, dict) or not value or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value.values()):
                raise AllocationFileError(bad.format(f"{key!r} must map every group to a channel count of 1 or more"))
            counts[key] = {str(k): int(v) for k, v in value.items()}
        if set(counts["kept"]) != set(counts["channels"]):
            raise AllocationFileError(bad.format("'kept' and 'channels' name different groups"))
        target = payload.get("target")
        if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0.0 <= target < 1.0:
            raise AllocationFileError(bad.format("'target' must be a reduction from 0 to 1"))
        overrides = payload.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise AllocationFileError(bad.format("'overrides' must map groups to channel counts"))
        return cls(kept=counts["kept"], channels=counts["channels"], allocator=str(payload.get("allocator") or ""),
                   target=float(target), checkpoint=str(payload.get("checkpoint") or ""),
                   overrides={str(k): int(v) for k, v in overrides.items()})

    @classmethod
    def read(cls, path: str | Path) -> FixedAllocation:
        from core import safe_json

        return cls.from_json(safe_json.read(path, error=AllocationFileError), str(path))

    def check(self, graph: PruningGraph, source: str) -> None:
        """Refuse an allocation made for another model: the groups or their channel counts
        differ from ``graph``'s, or a kept count is more than its group has."""
        here = {g.name: g.channels for g in graph.groups}
        other = (f"{source} was made for another model ({{}}); tune an allocation for this checkpoint on the "
                 "Layer importance page")
        if set(here) != set(self.channels):
            missing = sorted(set(here) - set(self.channels)) or sorted(set(self.channels) - set(here))
            raise AllocationFileError(other.format(f"its groups differ from this model's, e.g. {missing[0]!r}"))
        for name, channels in here.items():
            if self.channels[name] != channels:
                raise AllocationFileError(other.format(f"group {name!r} has {channels} channels here, "
                                                       f"{self.channels[name]} in the file"))
            if self.kept[name] > channels:
                raise AllocationFileError(other.format(f"it keeps {self.kept[name]} of the {channels} channels "
                                                       f"of group {name!r}"))
            step = graph.by_name[name].channel_step
            if self.kept[name] % step:  # GroupNorm groups are cut whole
                raise AllocationFileError(f"{source} keeps {self.kept[name]} channels of group {name!r}, which is "
                                          f"cut in steps of {step}; choose a multiple of {step}")


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


def prune_to(context: PruningContext, method: MethodSpec, kept: Mapping[str, int],
             progress: StageProgress | None = None) -> StepResult:
    """Cut the model to exactly ``kept`` channels per group, in place (a fixed allocation:
    no allocator runs); which filters go is the method's criterion's choice."""
    if progress is not None:
        progress(0.0, f"scoring filters ({method.criterion}) for the fixed allocation")
    analysis = analyse(context, method.criterion)
    graph = context.graph
    keep = np.array([kept[g.name] / g.channels for g in graph.groups], dtype=float)
    allocation = finish(FIXED, graph, context.cost, {g.name: int(kept[g.name]) for g in graph.groups}, keep,
                        {g.name: float(k) for g, k in zip(graph.groups, keep)}, True)
    removed = {g.name: select_removal(g, analysis.scores[g.name].tolist(), g.channels - allocation.kept[g.name])
               for g in graph.groups}
    history = graph.prune(removed)
    if progress is not None:
        progress(1.0, "cut to the fixed allocation")
    return StepResult(allocation=allocation, removed=removed, history=history, analysis=analysis)


def cut_as_decided(model: nn.Module, input_size: Sequence[int], in_channels: int,
                   removed: Mapping[str, Sequence[int]]) -> list:
    """Cut ``removed`` channel indices per group of ``model``, in place, as another process's
    `prune_step` decided on the same model (a torchrun rank following rank 0); the history."""
    return PruningGraph.traced(model, (int(input_size[0]), int(input_size[1])), in_channels).prune(removed)


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
