"""Substitutability: how well other filters of a group can stand in for a filter.

Pearson correlation of the group's output-channel responses over a calibration batch. The
responses are read after the group's normalisation layer (what a removed channel stops
sending downstream), optionally after ReLU. Memory is bounded: each batch contributes at most
``positions_per_batch`` randomly chosen spatial positions (seeded), gathered from the response
where it lives (no copy of the whole response), and only the running sums (C, C x C in float64)
are kept, so beyond the forward pass's own activations a group costs 8 x C^2 bytes plus
C x positions_per_batch x 8 bytes for the sample in flight (float64): 2 MiB + 32 MiB for a
512-channel group at the default 8192. With ``after_activation`` the ReLU makes one copy of
the response.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from core.models.graph import PrunableGroup, PruningError, PruningGraph
from core.models.runtime import eval_mode, model_device

DEFAULT_POSITIONS = 8192
# where substitutability's correlation comes from: the channels' responses on calibration
# images (the method), or the cosine of the filters' weights (no data needed; an approximation)
CORRELATION_SOURCES = {"activations": "response correlation (calibration images)",
                       "weights": "weight cosine (no data)"}


class CorrelationAccumulator:
    """Streaming Pearson correlation between the rows (channels) of C x P sample blocks."""

    def __init__(self, channels: int):
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64)

    def update(self, samples: torch.Tensor) -> None:
        x = samples.detach().to(torch.float64)
        self.n += x.shape[1]
        self.sum += x.sum(dim=1)
        self.outer += x @ x.T

    def correlation(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("need at least two samples for a correlation")
        mean = self.sum / self.n
        cov = self.outer / self.n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        # a constant channel (dead filter) correlates with nothing: 0, not NaN
        denom = torch.outer(std, std)
        corr = torch.where(denom > 1e-12, cov / denom.clamp_min(1e-12), torch.zeros_like(cov))
        corr.fill_diagonal_(1.0)
        return corr.clamp(-1, 1).numpy()


def sample_positions(response: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """N x C x H x W -> C x P with P <= count positions (image, y, x) drawn without
    replacement; the positions are gathered where the response lives, without a copy of it."""
    n, c, h, w = response.shape
    total = n * h * w
    if total <= count:
        return response.transpose(0, 1).reshape(c, -1)
    idx = torch.randperm(total, generator=generator)[:count].to(response.device)
    return response.flatten(2)[idx // (h * w), :, idx % (h * w)].T


@torch.no_grad()
def collect_correlations(
    model: nn.Module,
    graph: PruningGraph,
    batches: Iterable[torch.Tensor],
    groups: Iterable[PrunableGroup] | None = None,
    positions_per_batch: int = DEFAULT_POSITIONS,
    after_activation: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Correlation matrix (C x C, signed) of every group's channel responses."""
    groups = list(groups if groups is not None else graph.groups)
    accumulators = {g.name: CorrelationAccumulator(g.channels) for g in groups}
    generator = torch.Generator().manual_seed(seed)
    hooks = []

    def make_hook(name: str):
        def hook(_module, _inputs, output) -> None:
            out = output.relu() if after_activation else output
            accumulators[name].update(sample_positions(out, positions_per_batch, generator).float().cpu())
        return hook

    for g in groups:
        hooks.append(graph.modules[g.response_module].register_forward_hook(make_hook(g.name)))
    device = model_device(model)
    try:
        with eval_mode(model):
            for batch in batches:
                model(batch.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: acc.correlation() for name, acc in accumulators.items()}


def weight_cosine_matrix(graph: PruningGraph, group: PrunableGroup) -> np.ndarray:
    """Data-free stand-in for the response correlation: cosine similarity of the root conv's
    filters. Labelled as such wherever it is shown; it ignores what the data does."""
    weight = graph.modules[group.name].weight.detach()
    if isinstance(graph.modules[group.name], nn.ConvTranspose2d):
        weight = weight.transpose(0, 1)
    flat = weight.reshape(weight.shape[0], -1).to("cpu", torch.float64)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (flat @ flat.T).numpy()


def correlations_from(
    source: str,
    model: nn.Module,
    graph: PruningGraph,
    batches: Iterable[torch.Tensor],
    groups: Iterable[PrunableGroup] | None = None,
    **collect_options,
) -> dict[str, np.ndarray]:
    """The correlation matrix of every group (or of ``groups``) from ``source``, a key of
    `CORRELATION_SOURCES`: the responses to ``batches`` (`collect_correlations`), or the
    weights' cosine, which reads no batch."""
    if source not in CORRELATION_SOURCES:
        raise PruningError(f"unknown correlation source {source!r}; choose one of {', '.join(CORRELATION_SOURCES)}")
    groups = list(groups if groups is not None else graph.groups)
    if source == "weights":
        return {g.name: weight_cosine_matrix(graph, g) for g in groups}
    return collect_correlations(model, graph, batches, groups=groups, **collect_options)


def substitutability(abs_corr: np.ndarray, kept: np.ndarray | None = None) -> np.ndarray:
    """s_i = max over other kept j of |R_ij| (0 for a channel with no kept partner)."""
    r = np.abs(abs_corr).copy()
    np.fill_diagonal(r, -np.inf)
    if kept is not None:
        r[:, ~kept] = -np.inf
    s = r.max(axis=1)
    return np.where(np.isfinite(s), s, 0.0)
