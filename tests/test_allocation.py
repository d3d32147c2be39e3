"""Layer allocation: the scoring network, the baselines, and the MACs predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from core.allocation.baselines import allocate_by_sensitivity, allocate_global, allocate_uniform
from core.allocation.cost import CostModel
from core.allocation.masks import ranks_from_scores
from core.allocation.scoring_network import (
    ScoringNetworkSettings, allocate_by_scoring_network, allocation_from_logits,
)
from core.models.zoo import ModelSpec, build_model
from core.pruning.graph import PruningGraph, kept_count
from core.pruning.methods import resolve_method
from core.pruning.step import StepSettings, prune_step

SIZE = 64
CLASSES = ["background", "a", "b"]


def batches(n: int = 1, batch: int = 2, size: int = SIZE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 3, (batch, size, size), generator=g))
            for _ in range(n)]


def real_macs(model: nn.Module, in_channels: int = 3) -> float:
    macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, in_channels, SIZE, SIZE))
    return macs


@pytest.mark.parametrize("arch", ["unet", "fpn", "deeplabv3plus", "unetplusplus"])
@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v2"])
def test_scoring_network_meets_the_budget_after_real_pruning(arch, encoder):
    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES, arch=arch, encoder=encoder)).eval()
    before = real_macs(model)
    settings = StepSettings(scoring=ScoringNetworkSettings(steps=3))
    step = prune_step(model, (SIZE, SIZE), 3, resolve_method("collaborative", criterion="l1"), 0.6,
                      batches(), CLASSES, settings=settings)
    after = real_macs(model)
    assert step.allocation.budget_met
    assert 1 - after / before == pytest.approx(0.6, abs=0.02)
    assert model(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)


def test_predictor_matches_torch_pruning_after_pruning_random_ratios():
    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES)).eval()
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    cost = CostModel(graph)
    assert cost.predict()["macs"] == pytest.approx(real_macs(model), rel=1e-6)
    rng = np.random.default_rng(0)
    kept = {g.name: kept_count(g.channels, rng.uniform(0.1, 1.0)) for g in graph.groups}
    predicted = cost.predict(kept)
    graph.prune({g.name: list(range(g.channels - kept[g.name])) for g in graph.groups})
    params = sum(p.numel() for p in model.parameters())
    assert predicted["macs"] == pytest.approx(real_macs(model), rel=0.02)
    assert predicted["params"] == pytest.approx(params, rel=0.02)


def test_predictor_answers_in_milliseconds():
    import time

    model = build_model(ModelSpec(classes=CLASSES)).eval()
    cost = CostModel(PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE)))
    start = time.perf_counter()
    for ratio in np.linspace(0.1, 1.0, 20):
        cost.macs(torch.full((len(cost.group_names),), float(ratio)))
    per_call = (time.perf_counter() - start) / 20
    assert per_call < 0.05  # generous: it is a few small matrix products


class TwoBranchNet(nn.Module):
    """Two equal-cost branches; only branch A reaches the output with any weight."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv_b, self.bn_b = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.segmentation_head = nn.Sequential(nn.Conv2d(2 * width, 2, 3, padding=1))

    def forward(self, x):
        a = torch.relu(self.bn_a(self.conv_a(x)))
        b = torch.relu(self.bn_b(self.conv_b(x))) * 1e-3  # carries (almost) nothing
        return self.segmentation_head(torch.cat([a, b], dim=1))


def test_scoring_network_keeps_more_of_the_branch_that_carries_the_signal():
    torch.manual_seed(0)
    net = TwoBranchNet()
    x = torch.randn(16, 3, 16, 16)
    y = (x[:, 0] > 0.3).long()  # a defect wherever channel 0 is bright
    optimiser = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
    net.eval()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    cost = CostModel(graph)
    ranks = {g.name: np.arange(g.channels) for g in graph.groups}
    allocation = allocate_by_scoring_network(
        net, graph, cost, ranks, [(x[:8], y[:8]), (x[8:], y[8:])], 0.5, ["background", "defect"],
        settings=ScoringNetworkSettings(steps=120, seed=0))
    keep = allocation.keep_ratio
    assert keep["conv_a"] > keep["conv_b"] + 0.2
    assert allocation.group_importance["conv_a"] > allocation.group_importance["conv_b"]
    assert allocation.class_importance["conv_a"]["defect"] > allocation.class_importance["conv_b"]["defect"]
    # the dashboard re-meets budgets from the stored logits alone: same answer at the same target
    again = allocation_from_logits(graph, cost, allocation.details["logits"], 0.5)
    assert again.kept == allocation.kept
    tighter = allocation_from_logits(graph, cost, allocation.details["logits"], 0.7)
    assert tighter.predicted["macs_reduction"] == pytest.approx(0.7, abs=0.05)
    assert tighter.kept["conv_a"] >= tighter.kept["conv_b"]


def test_baseline_allocators_meet_the_budget():
    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES)).eval()
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    cost = CostModel(graph)
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.channels) for g in graph.groups}
    ranks = {n: ranks_from_scores(s) for n, s in scores.items()}
    uniform = allocate_uniform(graph, cost, 0.5)
    global_ = allocate_global(graph, cost, scores, 0.5)
    sensitivity = allocate_by_sensitivity(model, graph, cost, ranks, batches(), 0.5, [1.0, 1.0, 1.0],
                                          levels=(0.5, 0.9))
    for allocation in (uniform, global_, sensitivity):
        assert allocation.budget_met
        assert allocation.predicted["macs_reduction"] == pytest.approx(0.5, abs=0.02)
        assert set(allocation.kept) == {g.name for g in graph.groups}
    ratios = set(round(r, 2) for r in uniform.keep_ratio.values())
    assert len(ratios) == 1
    # limits hold: no group loses more than 90% of its channels
    assert all(k >= np.ceil(0.1 * graph.by_name[n].channels) for n, k in global_.kept.items())


def test_per_scale_importance_covers_every_scale():
    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES)).eval()
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    allocation = allocate_uniform(graph, CostModel(graph), 0.5)
    assert set(allocation.scale_importance) == {g.scale for g in graph.groups} == {1, 2, 4, 8, 16, 32}
