"""The scoring network (METHOD.md part 2): learn how much of each group to keep.

One logit a_l per group gives k_l = k_min + (1 - k_min) sigmoid(a_l). Channels, ranked by the
filter criterion, are softly masked by m_lc = sigmoid((k_l C_l - rank_lc - 0.5) / tau), with
tau annealed from 2 to 0.25. With the weights frozen (BatchNorm in eval), Adam trains only the
logits on a class-balanced segmentation loss plus a *linear* cost pressure
lambda x cost(k) / cost_0, the cost model's budget: the closed-form MACs, or the latency table's
milliseconds (piecewise-linear in k, `core.allocation.latency`). Then one shared offset added to
every logit, found by bisection on that cost, meets the budget exactly. (A squared penalty on the budget pushes
every logit down alike and gives an almost uniform allocation; the linear pressure lets the
loss decide where channels matter.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.progress import StageProgress
from core.allocation.base import (
    Allocation, AllocationLimits, counts_for, fill_budget, finish, meet_budget,
)
from core.allocation.context import Allocator, PruningContext, StoredResults, require
from core.allocation.cost import CostModel
from core.allocation.masks import ChannelMasks, ranks_from_scores
from core.importance.scoring import GroupAnalysis
from core.models.graph import PruningGraph
from core.models.runtime import eval_mode, model_device
from core.precision import autocast
from core.train import SegmentationLoss


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Weights frozen and BatchNorm in eval for the duration; both restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    with eval_mode(model):
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)


def allocate_by_scoring_network(context: PruningContext, analysis: GroupAnalysis, target_reduction: float,
                                progress: StageProgress | None = None) -> Allocation:
    """Per-group kept channels that remove ``target_reduction`` of the current MACs, channels
    ranked by the analysis' scores. The frozen model's forward passes run in the settings'
    precision (bf16 autocast or fp32); the logits, the cost and the loss stay fp32."""
    model, graph, cost, batches = context.model, context.graph, context.cost, context.batches
    settings, limits, precision = context.settings.scoring, context.settings.limits, context.settings.precision
    ranks = {name: ranks_from_scores(s) for name, s in analysis.scores.items()}
    torch.manual_seed(settings.seed)
    loss_fn = SegmentationLoss(torch.as_tensor(context.class_weights, dtype=torch.float32))
    device = model_device(model)
    logits = torch.zeros(len(graph.groups), requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=settings.lr)
    k_min = settings.k_min
    free = _free_groups(graph, limits)  # protected groups stay whole while the scorer learns too
    history = []
    with frozen_weights(model), ChannelMasks(graph, ranks) as masks:
        for step in range(settings.steps):
            frac = step / max(settings.steps - 1, 1)
            tau = settings.tau_start * (settings.tau_end / settings.tau_start) ** frac
            keep = _keep(logits, k_min, free)
            masks.set_soft(keep.to(device), tau)
            images, targets = batches[step % len(batches)]
            with autocast(device, precision):
                out = model(images.to(device))
            seg = loss_fn.to(device)(out, targets.to(device))
            pressure = settings.pressure * cost.budget(keep) / cost.budget0
            loss = seg + pressure.float()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            history.append({"step": step, "loss": float(seg.detach()), "macs_ratio": float(pressure.detach()) / settings.pressure})
            if progress is not None and progress((step + 1) / settings.steps, f"scoring network step {step + 1}/{settings.steps}"):
                break
        final_logits = logits.detach().clone()
        class_importance = _class_importance(context, masks, final_logits, free, device)

    allocation = allocation_from_logits(graph, cost, final_logits.numpy(), target_reduction, k_min, limits)
    allocation.class_importance = class_importance
    allocation.details.update({"history": history, "logits": final_logits.tolist()})
    return allocation


def allocation_from_logits(graph: PruningGraph, cost: CostModel, logits: Sequence[float], target_reduction: float,
                           k_min: float = 0.05, limits: AllocationLimits | None = None) -> Allocation:
    """Meet a budget with trained logits: one shared offset, found by bisection on the
    closed-form MACs, then the rounding leftovers refilled. Milliseconds: the dashboard calls
    this for every position of its target slider."""
    limits = limits or AllocationLimits()
    base = torch.as_tensor(np.asarray(logits, dtype=np.float64))

    free = _free_groups(graph, limits)

    def keep_at(offset: float) -> np.ndarray:
        return _keep(base + offset, k_min, free).numpy()

    target = cost.budget0 * (1.0 - target_reduction)
    offset, kept, met = meet_budget(cost, lambda o: counts_for(graph, keep_at(o), limits), target, -30.0, 30.0)
    keep = keep_at(offset)
    if met:
        kept = fill_budget(cost, graph, kept, {g.name: k * g.channels for g, k in zip(graph.groups, keep)},
                           target, limits)
    importance = {g.name: float(k) for g, k in zip(graph.groups, keep)}
    return finish("scoring-network", graph, cost, kept, keep, importance, met, details={"offset": offset})


def _free_groups(graph: PruningGraph, limits: AllocationLimits) -> torch.Tensor:
    return torch.tensor([not limits.protected(g) for g in graph.groups])


def _keep(logits: torch.Tensor, k_min: float, free: torch.Tensor) -> torch.Tensor:
    """k = k_min + (1 - k_min) sigmoid(a) for free groups; protected groups keep everything."""
    return torch.where(free, k_min + (1 - k_min) * torch.sigmoid(logits), 1.0)


def _class_importance(context: PruningContext, masks: ChannelMasks, logits: torch.Tensor, free: torch.Tensor,
                      device: torch.device) -> dict[str, dict[str, float]]:
    """Group x defect-class importance: minus the gradient of each defect class's loss (CE on
    that class's pixels) with respect to the group's logit, scaled to [-1, 1] per class.
    Positive: keeping more of the group helps that class. Measured on the context's model and
    first calibration batches, at the scoring network's final temperature (``masks`` already
    over the model, ``free`` its unprotected groups)."""
    model, graph, batches, class_names = context.model, context.graph, context.batches, context.class_names
    k_min, tau, precision = context.settings.scoring.k_min, context.settings.scoring.tau_end, context.settings.precision
    a = logits.clone().requires_grad_(True)
    grads = {name: torch.zeros(len(graph.groups)) for name in class_names[1:]}
    for images, targets in batches[: max(1, min(len(batches), 4))]:
        masks.set_soft(_keep(a, k_min, free).to(device), tau)
        with autocast(device, precision):
            out = model(images.to(device))
        pixel_loss = F.cross_entropy(out.float(), targets.to(device), reduction="none")
        for c, name in enumerate(class_names[1:], start=1):
            region = targets.to(device) == c
            if not region.any():
                continue
            (grad,) = torch.autograd.grad(pixel_loss[region].mean(), a, retain_graph=True)
            grads[name] -= grad.cpu()
    matrix: dict[str, dict[str, float]] = {g.name: {} for g in graph.groups}
    for name, g in grads.items():
        scale = float(g.abs().max()) or 1.0
        for group in graph.groups:
            matrix[group.name][name] = float(g[group.index]) / scale
    return matrix


class ScoringNetworkAllocator(Allocator):
    label = "scoring network"
    needs = ("logits",)

    def allocate(self, context: PruningContext, analysis: GroupAnalysis, target_reduction: float,
                 progress: StageProgress | None = None) -> Allocation:
        return allocate_by_scoring_network(context, analysis, target_reduction, progress=progress)

    def recreate(self, graph: PruningGraph, cost: CostModel, target_reduction: float, stored: StoredResults,
                 limits: AllocationLimits | None = None) -> Allocation:
        logits = require(stored.logits, "scoring-network", "a scoring job's logits")
        return allocation_from_logits(graph, cost, logits, target_reduction, limits=limits)
