"""What the Layer importance page's live tuning calls, as plain functions: the page answers
every slider move with `live_allocation` + `CostModel.predict` (and the predicted latency with
`cached_latency_model`, when this machine's table holds the model; `measure_latency_model`
behind a button otherwise), and its preview button with `preview_pruned`; bench/ui.py times exactly these calls against the dashboard's limits
(300 ms for an allocation, about 2 s for a preview of the default model at 128 px)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from core.allocation.base import Allocation, AllocationLimits
from core.allocation.baselines import SENSITIVITY_LEVELS
from core.allocation.context import LiveAllocationError, StoredResults
from core.allocation.cost import CostModel
from core.allocation.latency import (
    LatencyCostModel, LatencySettings, cached_latency_cost_model, latency_cost_model,
)
from core.allocation.registry import ALLOCATORS
from core.data.dataset import SegmentationDataset, normalise
from core.progress import StageProgress
from core.importance.magnitude import ContributionImportance
from core.metrics import ConfusionMatrix, SegmentationMetrics
from core.models.graph import PruningGraph
from core.models.runtime import model_device
from core.pruning.step import pruned_copy
from core.visual import overlay_mask


def allocator_labels() -> dict[str, str]:
    """The page's allocator choices: label -> registry name, in the registry's order (read at
    each call, so a line added to the registry is a choice at once)."""
    return {allocator.label or name: name for name, allocator in ALLOCATORS.items()}


def allocator_needs(allocator: str) -> tuple[str, ...]:
    """What the live answer of ``allocator`` (a registry name) reads: the `StoredResults`
    fields, from `NEEDS`, that `live_allocation` must be given."""
    if allocator not in ALLOCATORS:
        raise LiveAllocationError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[allocator].needs


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
    each allocator's `Allocator.recreate`, given what its `Allocator.needs` names (uniform
    needs nothing, global the L1 scores, the scoring network its trained logits and
    sensitivity its measured curves, the last two from a score job)."""
    if allocator not in ALLOCATORS:
        raise LiveAllocationError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    stored = StoredResults(l1_scores=l1_scores, logits=logits, drops=drops, levels=levels)
    return ALLOCATORS[allocator].recreate(graph, cost, target_reduction, stored, limits)


def cached_latency_model(graph: PruningGraph, engine: str = "torch", threads: int = 1) -> LatencyCostModel | None:
    """The latency cost model of ``graph``'s model from this machine's cached table, measuring
    nothing (None when the table lacks any of it): cheap enough for every page run."""
    return cached_latency_cost_model(graph, LatencySettings(engine=engine, threads=threads))


def measure_latency_model(graph: PruningGraph, engine: str = "torch", threads: int = 1,
                          progress: StageProgress | None = None) -> LatencyCostModel:
    """Measure what this machine's table lacks for ``graph``'s model (bounded: the default grid
    and repeats; ``progress`` follows it and stops it) and return its latency cost model."""
    return latency_cost_model(graph, LatencySettings(engine=engine, threads=threads), progress)


@dataclass
class Preview:
    pictures: list[np.ndarray]  # per image: ground truth, unpruned, pruned copy (RGB overlays)
    captions: list[str]
    seconds: float  # pruning the copy and predicting, what the user waits for


@torch.no_grad()
def preview_pruned(model: nn.Module, input_size: Sequence[int], in_channels: int, kept: Mapping[str, int],
                   dataset: SegmentationDataset, images: int = 3) -> Preview:
    """Prune a copy of ``model`` to ``kept`` channels per group (group L1 within each group,
    no fine-tuning) and overlay the ground truth, the unpruned model's masks and the copy's
    on the first ``images`` of ``dataset``, each model's captioned with its defect mIoU on
    that image. The model itself is untouched."""
    start = time.perf_counter()
    pruned = pruned_copy(model, input_size, in_channels, dict(kept))
    pictures, captions = [], []
    for i in range(min(images, len(dataset))):
        image, truth = dataset.raw(i)
        x = normalise(image, in_channels, dataset.normalisation)[None].to(model_device(model))
        pictures.append(overlay_mask(image, truth))
        captions.append(f"image {i + 1}: ground truth")
        for label, net in (("unpruned", model), ("pruned copy", pruned)):
            logits = net(x)
            mask = logits.argmax(1)[0].cpu().numpy().astype("uint8")
            pictures.append(overlay_mask(image, mask))
            miou = SegmentationMetrics.from_confusion(
                ConfusionMatrix(logits.shape[1]).update(mask, truth)).defect_miou
            # an image with no defect in truth or prediction has no defect IoU to give
            captions.append(f"{label}: defect mIoU {'n/a' if miou is None else f'{miou:.1f}'}")
    return Preview(pictures, captions, time.perf_counter() - start)
