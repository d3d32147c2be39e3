"""What the Layer importance page's live tuning calls, as plain functions: the page answers
every slider move with `live_allocation` + `CostModel.predict`, and its preview button with
`preview_pruned`; bench/ui.py times exactly these calls against the dashboard's limits
(300 ms for an allocation, about 2 s for a preview of the default model at 128 px)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from core.allocation.base import Allocation, AllocationLimits
from core.allocation.baselines import SENSITIVITY_LEVELS, allocate_global, allocate_uniform, allocation_from_drops
from core.allocation.cost import CostModel
from core.allocation.scoring_network import allocation_from_logits
from core.data.dataset import SegmentationDataset, normalise
from core.errors import DefectPruneError
from core.importance.criteria import ContributionImportance
from core.pruning.graph import PruningGraph
from core.pruning.step import pruned_copy
from core.visual import overlay_mask

LIVE_ALLOCATORS = ("uniform", "global", "scoring-network", "sensitivity")


class LiveAllocationError(DefectPruneError):
    """A live allocator was asked for without the stored results it answers from."""


def group_l1_scores(graph: PruningGraph) -> dict[str, np.ndarray]:
    """Each channel's group L1 contribution: what the global allocator ranks (computed once
    per model; the page caches it)."""
    importance = ContributionImportance()
    return {g.name: importance.contribution(graph.tp_group(g, range(g.channels))) for g in graph.groups}


def live_allocation(
    allocator: str, graph: PruningGraph, cost: CostModel, target_reduction: float, *,
    l1_scores: Mapping[str, np.ndarray] | None = None, logits: Sequence[float] | None = None,
    drops: Mapping[str, Sequence[float]] | None = None, levels: Sequence[float] = SENSITIVITY_LEVELS,
    limits: AllocationLimits | None = None,
) -> Allocation:
    """An allocation for ``target_reduction`` from what is already known (no forward pass):
    uniform needs nothing, global the L1 scores, the scoring network its trained logits and
    sensitivity its measured curves (the last two from a score job)."""
    needs = {"global": ("L1 scores", l1_scores), "scoring-network": ("a scoring job's logits", logits),
             "sensitivity": ("measured sensitivity curves", drops)}
    if allocator not in LIVE_ALLOCATORS:
        raise LiveAllocationError(f"unknown allocator {allocator!r}; choose one of {', '.join(LIVE_ALLOCATORS)}")
    if allocator in needs and needs[allocator][1] is None:
        raise LiveAllocationError(f"the {allocator} allocator answers from {needs[allocator][0]}; "
                                  "run the job that measures them first")
    if allocator == "uniform":
        return allocate_uniform(graph, cost, target_reduction, limits)
    if allocator == "global":
        return allocate_global(graph, cost, l1_scores, target_reduction, limits)
    if allocator == "scoring-network":
        return allocation_from_logits(graph, cost, logits, target_reduction, limits=limits)
    return allocation_from_drops(graph, cost, drops, target_reduction, limits, levels)


@dataclass
class Preview:
    pictures: list[np.ndarray]  # per image: unpruned, pruned copy, ground truth (RGB overlays)
    captions: list[str]
    seconds: float  # pruning the copy and predicting, what the user waits for


@torch.no_grad()
def preview_pruned(model: nn.Module, input_size: Sequence[int], in_channels: int, kept: Mapping[str, int],
                   dataset: SegmentationDataset, images: int = 3) -> Preview:
    """Prune a copy of ``model`` to ``kept`` channels per group (group L1 within each group,
    no fine-tuning) and overlay its masks, the unpruned model's and the ground truth on the
    first ``images`` of ``dataset``. The model itself is untouched."""
    start = time.perf_counter()
    pruned = pruned_copy(model, input_size, in_channels, dict(kept))
    pictures, captions = [], []
    for i in range(min(images, len(dataset))):
        image, truth = dataset.raw(i)
        x = normalise(image, in_channels)[None].to(next(model.parameters()).device)
        for label, net in (("unpruned", model), ("pruned copy", pruned)):
            pictures.append(overlay_mask(image, net(x).argmax(1)[0].cpu().numpy().astype("uint8")))
            captions.append(f"{label} {i + 1}")
        pictures.append(overlay_mask(image, truth))
        captions.append(f"ground truth {i + 1}")
    return Preview(pictures, captions, time.perf_counter() - start)
