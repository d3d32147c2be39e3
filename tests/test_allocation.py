"""Layer allocation: the scoring network, the baselines, and the MACs predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from core.allocation.base import AllocationLimits
from core.allocation.baselines import allocate_by_sensitivity, allocate_global, allocate_uniform
from core.allocation.cost import CostModel
from core.allocation.context import PruningContext, ScoringNetworkSettings, StepSettings
from core.allocation.scoring_network import allocate_by_scoring_network, allocation_from_logits
from core.importance.scoring import GroupAnalysis
from core.models.graph import PruningGraph, kept_count
from core.models.zoo import ModelSpec, build_model
from core.pruning.methods import resolve_method
from core.pruning.step import prune_step, pruning_context

SIZE = 64
CLASSES = ["background", "a", "b"]


def batches(n: int = 1, batch: int = 2, size: int = SIZE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 3, (batch, size, size), generator=g))
            for _ in range(n)]


def context_of(model: nn.Module, graph: PruningGraph, cost: CostModel, calibration, classes=CLASSES,
               settings: StepSettings | None = None, size: int = SIZE) -> PruningContext:
    """The step's context around a graph the test built (class weights 1)."""
    return PruningContext(model=model, graph=graph, cost=cost, batches=calibration, class_names=list(classes),
                          class_weights=[1.0] * len(classes), input_size=(size, size), in_channels=3,
                          settings=settings or StepSettings())


def scored(scores) -> GroupAnalysis:
    """An analysis with these channel scores (the allocators rank channels by them)."""
    return GroupAnalysis(scores=dict(scores), correlations={})


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
    step = prune_step(pruning_context(model, (SIZE, SIZE), 3, batches(), CLASSES, settings=settings),
                      resolve_method("collaborative", criterion="l1"), 0.6)
    after = real_macs(model)
    assert step.allocation.budget_met
    assert 1 - after / before == pytest.approx(0.6, abs=0.02)
    assert model(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet"])
def test_predictor_matches_torch_pruning_after_pruning_random_ratios(arch):
    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES, arch=arch)).eval()
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    cost = CostModel(graph)
    assert cost.predict()["macs"] == pytest.approx(real_macs(model), rel=1e-6)
    rng = np.random.default_rng(0)
    kept = {g.name: kept_count(g.channels, rng.uniform(0.1, 1.0), step=g.channel_step) for g in graph.groups}
    predicted = cost.predict(kept)
    graph.prune({g.name: list(range(g.channels - kept[g.name])) for g in graph.groups})
    params = sum(p.numel() for p in model.parameters())
    assert predicted["macs"] == pytest.approx(real_macs(model), rel=0.02)
    assert predicted["params"] == pytest.approx(params, rel=0.02)


def test_a_parameter_floor_scales_the_cut_back_to_land_on_it():
    from core.allocation.base import cap_at_params

    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES)).eval()
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    cost = CostModel(graph)
    deep = allocate_uniform(graph, cost, 0.8)
    floor = cost.params0 * (1 - 0.5)  # a 50% parameter target that the 80%-MACs cut overshoots
    assert deep.predicted["params"] < floor
    capped = cap_at_params(cost, graph, deep, floor, AllocationLimits())
    assert capped.predicted["params"] <= floor  # the target is reached ...
    assert capped.predicted["params_reduction"] == pytest.approx(0.5, abs=0.01)  # ... not overshot
    assert all(capped.kept[n] >= deep.kept[n] for n in deep.kept)  # the same cut, scaled back
    assert cap_at_params(cost, graph, deep, deep.predicted["params"] / 2, AllocationLimits()) is deep


def test_sensitivity_measuring_ends_at_a_stop_request():
    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES)).eval()
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.channels) for g in graph.groups}
    calls = []

    def stop_at_once(fraction, message):
        calls.append(message)
        return True

    allocation = allocate_by_sensitivity(context_of(model, graph, CostModel(graph), batches()), scored(scores), 0.5,
                                         levels=(0.5, 0.9), progress=stop_at_once)
    assert len(calls) == 1  # not one more group measured after the stop
    measured = [n for n, curve in allocation.details["drops"].items() if len(curve) > 1]
    assert measured == [graph.groups[0].name]


class TwoBranchNet(nn.Module):
    """Two equal-cost branches; only branch A reaches the output with any weight. A mixing conv
    sits between them and the classifier (the group the classifier reads is kept whole)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv_b, self.bn_b = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.mix, self.bn_mix = nn.Conv2d(2 * width, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.segmentation_head = nn.Sequential(nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x):
        a = torch.relu(self.bn_a(self.conv_a(x)))
        b = torch.relu(self.bn_b(self.conv_b(x))) * 1e-3  # carries (almost) nothing
        return self.segmentation_head(torch.relu(self.bn_mix(self.mix(torch.cat([a, b], dim=1)))))


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
    first_best = {g.name: -np.arange(g.channels, dtype=np.float64) for g in graph.groups}  # ranks 0, 1, 2, ...
    context = context_of(net, graph, cost, [(x[:8], y[:8]), (x[8:], y[8:])], ["background", "defect"],
                         StepSettings(scoring=ScoringNetworkSettings(steps=120, seed=0)), size=16)
    allocation = allocate_by_scoring_network(context, scored(first_best), 0.5)
    keep = allocation.keep_ratio
    assert keep["mix"] == 1.0 and allocation.kept["mix"] == 8  # the classifier's input stays whole
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
    uniform = allocate_uniform(graph, cost, 0.5)
    global_ = allocate_global(graph, cost, scores, 0.5)
    sensitivity = allocate_by_sensitivity(context_of(model, graph, cost, batches()), scored(scores), 0.5,
                                          levels=(0.5, 0.9))
    for allocation in (uniform, global_, sensitivity):
        assert allocation.budget_met
        assert allocation.predicted["macs_reduction"] == pytest.approx(0.5, abs=0.02)
        assert set(allocation.kept) == {g.name for g in graph.groups}
    ratios = set(round(r, 2) for r in uniform.keep_ratio.values())
    assert len(ratios) == 1
    # limits hold: no group loses more than 90% of its channels, the classifier's input none
    assert all(k >= np.ceil(0.1 * graph.by_name[n].channels) for n, k in global_.kept.items())
    head = [g for g in graph.groups if g.feeds_classifier]
    assert [g.name for g in head] == ["decoder.blocks.4.conv2.0"]
    for allocation in (uniform, global_, sensitivity):
        assert allocation.kept[head[0].name] == head[0].channels
    unprotected = allocate_uniform(graph, cost, 0.5, AllocationLimits(protect_head_input=False))
    assert unprotected.kept[head[0].name] < head[0].channels


def test_per_scale_importance_covers_every_scale():
    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES)).eval()
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    allocation = allocate_uniform(graph, CostModel(graph), 0.5)
    assert set(allocation.scale_importance) == {g.scale for g in graph.groups} == {1, 2, 4, 8, 16, 32}


def test_stored_sensitivity_curves_answer_any_target_like_the_measuring_allocator():
    """The dashboard measures the curves once (a score job) and re-allocates from them per
    slider position: the same allocation as measuring again, the budget met at every target,
    and curves of another model refused by name."""
    from core.allocation.baselines import SensitivityCurveError, allocation_from_drops

    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES)).eval()
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    cost = CostModel(graph)
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.channels) for g in graph.groups}
    levels = (0.5, 0.9)
    measured = allocate_by_sensitivity(context_of(model, graph, cost, batches()), scored(scores), 0.5, levels=levels)
    drops = measured.details["drops"]
    assert set(drops) == {g.name for g in graph.groups}
    assert all(len(curve) == 3 and curve[0] == 0.0 for curve in drops.values())
    assert measured.details["levels"] == [0.5, 0.9]
    again = allocation_from_drops(graph, cost, drops, 0.5, levels=levels)
    assert again.kept == measured.kept and again.budget_met
    previous = None
    for target in (0.2, 0.4, 0.6, 0.7):
        allocation = allocation_from_drops(graph, cost, drops, target, levels=levels)
        assert allocation.budget_met
        assert allocation.predicted["macs_reduction"] >= target - 1e-9
        assert allocation.predicted["macs_reduction"] == pytest.approx(target, abs=0.02)
        if previous is not None:  # a tighter budget never keeps more MACs
            assert allocation.predicted["macs"] <= previous.predicted["macs"]
        previous = allocation
    # the least sensitive group goes first, though others save more MACs per level (3.75% at 90% here)
    first = allocation_from_drops(graph, cost, {n: [0.0, 10.0, 20.0] for n in drops}
                                  | {"encoder.layer4.0.conv1": [0.0, 0.0, 0.0]}, 0.03, levels=levels)
    cut = {n for n, k in first.kept.items() if k < graph.by_name[n].channels}
    assert cut == {"encoder.layer4.0.conv1"}
    with pytest.raises(SensitivityCurveError, match="another model"):
        allocation_from_drops(graph, cost, {"decoder.no_such_layer": [0.0, 1.0, 2.0]}, 0.5, levels=levels)


def test_every_allocator_declares_what_its_live_answer_needs_and_gets_it_from_those_alone():
    from core.allocation.context import NEEDS, Allocator, LiveAllocationError, StoredResults
    from core.allocation.registry import ALLOCATORS

    torch.manual_seed(0)
    graph = PruningGraph(build_model(ModelSpec(classes=CLASSES)).eval(), torch.zeros(1, 3, SIZE, SIZE))
    cost = CostModel(graph)
    every = StoredResults(l1_scores={g.name: np.arange(g.channels, dtype=float) + 1 for g in graph.groups},
                          logits=[0.0] * len(graph.groups),
                          drops={g.name: [0.0, 0.1, 0.2, 0.3, 0.4] for g in graph.groups})
    for name, allocator in ALLOCATORS.items():
        assert set(allocator.needs) <= set(NEEDS), name
        given = StoredResults(**{need: getattr(every, need) for need in allocator.needs})
        assert allocator.recreate(graph, cost, 0.5, given).budget_met, name
        for need in allocator.needs:  # each one is needed: without it there is no answer
            without = StoredResults(**{n: getattr(every, n) for n in allocator.needs if n != need})
            with pytest.raises(LiveAllocationError):
                allocator.recreate(graph, cost, 0.5, without)
    with pytest.raises(TypeError, match="needs must be a tuple of l1_scores, logits, drops"):
        class Misspelt(Allocator):
            needs = ("l1-scores",)
