"""What one pruning step hands every allocator: the `PruningContext` (the model, its graph and
cost model, the calibration batches, the classes and the step's settings), and the `Allocator`
interface the registry (`core.allocation.registry`) holds.

Defined here, below the pruning loop, because the allocators read all of it; the step
(`core.pruning.step`) builds one context per step and passes it down."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from core.progress import StageProgress
from core.allocation.base import Allocation, AllocationLimits
from core.allocation.cost import CostModel
from core.allocation.latency import LatencySettings, latency_cost_model
from core.errors import DefectPruneError
from core.importance.scoring import GroupAnalysis
from core.importance.substitutability import DEFAULT_POSITIONS
from core.models.graph import PruningGraph

Batch = tuple[torch.Tensor, torch.Tensor]


class LiveAllocationError(DefectPruneError):
    """A live allocator was asked for without the stored results it answers from."""


@dataclass
class ScoringNetworkSettings:
    steps: int = 300
    lr: float = 0.1
    # lambda of the linear MACs pressure. METHOD.md suggests about 1; on NEU-Seg (one shot to
    # 80% fewer MACs, 2 fine-tune epochs, validation) 0.3 gave 59.95 defect mIoU against 58.22
    # at 1.0 and 57.75 for uniform allocation: a lighter pressure leaves the stride-8 layers
    # more channels (bench/results/neu_allocation_check.md).
    pressure: float = 0.3
    tau_start: float = 2.0
    tau_end: float = 0.25
    k_min: float = 0.05
    seed: int = 0


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
    # None: allocators budget the closed-form MACs; else milliseconds from the machine's latency
    # table (`core.allocation.latency`), measured where the cache lacks it
    latency: LatencySettings | None = None


@dataclass
class PruningContext:
    """Everything one pruning step reads, built once per step (`pruning_context`). The graph
    goes stale once the model is cut: the next step builds a new context."""

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
                    settings: StepSettings | None = None, progress: StageProgress | None = None) -> PruningContext:
    """The context of one step on ``model`` as it is now (graph traced at ``input_size``);
    class weights default to 1 per class. With latency settings the cost model is the latency
    table's (``progress`` follows whatever it has to measure)."""
    size = (int(input_size[0]), int(input_size[1]))
    graph = PruningGraph.traced(model, size, in_channels)
    weights = list(class_weights) if class_weights is not None else [1.0] * len(class_names)
    settings = settings or StepSettings()
    cost = CostModel(graph) if settings.latency is None else latency_cost_model(graph, settings.latency, progress)
    return PruningContext(model=model, graph=graph, cost=cost, batches=batches,
                          class_names=list(class_names), class_weights=weights, input_size=size,
                          in_channels=int(in_channels), settings=settings)


# What a live allocation may need from earlier measurements, each a field of `StoredResults`:
# the group L1 scores (computed from the weights in a second), a score job's scoring-network
# logits, or a sensitivity job's curves (with their levels). A front end builds these and no
# more; an allocator names the ones its `recreate` reads in `Allocator.needs`.
NEEDS: tuple[str, ...] = ("l1_scores", "logits", "drops")


@dataclass
class StoredResults:
    """What a live allocation answers from instead of measuring (the dashboard's tuning):
    group L1 scores, a score job's scoring-network logits or sensitivity curves."""

    l1_scores: Mapping[str, np.ndarray] | None = None
    logits: Sequence[float] | None = None
    drops: Mapping[str, Sequence[float]] | None = None
    levels: Sequence[float] | None = None  # the sensitivity levels of ``drops`` (None: the defaults)


class Allocator(ABC):
    """How much of each group a step keeps. ``label`` is how the dashboard names it; ``needs``
    the stored results (names from `NEEDS`) its live answer, `recreate`, reads: the dashboard
    builds those, and allocates live once every one of them is there."""

    label: str = ""
    needs: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = [need for need in cls.needs if need not in NEEDS]
        if unknown or not isinstance(cls.needs, tuple):
            raise TypeError(f"{cls.__name__}.needs must be a tuple of {', '.join(NEEDS)}; got {cls.needs!r}")

    @abstractmethod
    def allocate(self, context: PruningContext, analysis: GroupAnalysis, target_reduction: float,
                 progress: StageProgress | None = None) -> Allocation:
        """Kept channels per group that remove ``target_reduction`` of the current cost (the
        context's cost model's budget: MACs, or ms from a latency table)."""

    def recreate(self, graph: PruningGraph, cost: CostModel, target_reduction: float, stored: StoredResults,
                 limits: AllocationLimits | None = None) -> Allocation:
        """The allocation for a target from ``stored`` results, without a forward pass (what
        the live tuning calls for every slider position)."""
        raise LiveAllocationError(f"the {self.label or type(self).__name__} allocator has no live answer")


def require(value, allocator: str, what: str):
    """``value``, or the error that says which stored result the live allocator answers from."""
    if value is None:
        raise LiveAllocationError(f"the {allocator} allocator answers from {what}; run the job that measures them first")
    return value
