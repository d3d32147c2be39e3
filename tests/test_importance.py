"""Filter scoring: correlation, substitutability, combined score, collaborative removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.importance.collaborative import collaborative_removal_order, min_max, substitutability_scores
from core.importance.criteria import CRITERIA, make_importance
from core.importance.magnitude import ContributionImportance
from core.importance.substitutability import (
    CorrelationAccumulator, collect_correlations, sample_positions, weight_cosine_matrix,
)
from core.models.graph import PruningGraph


class TwoLayerNet(nn.Module):
    """conv-bn-relu x 2 and a classifier head, shaped like a segmentation model."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.segmentation_head = nn.Sequential(nn.Conv2d(width, 2, 1))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.segmentation_head(x)


def duplicate_filter_net() -> TwoLayerNet:
    """conv1: filter 2 is the weakest; filters 0 and 1 are identical, of middling strength."""
    torch.manual_seed(0)
    net = TwoLayerNet().eval()
    with torch.no_grad():
        w = net.conv1.weight
        w.copy_(torch.randn_like(w))
        w[2] *= 0.1
        w[1] = w[0]
        net.conv2.weight.mul_(0.0).add_(1.0)  # equal consumer weights: input L1 equal per channel
    return net


def conv1_group(graph: PruningGraph):
    group = graph.by_name["conv1"]
    return group, graph.tp_group(group, range(group.channels))


def test_greedy_keeps_exactly_one_of_two_identical_filters_where_l1_takes_both():
    net = duplicate_filter_net()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    torch.manual_seed(1)
    correlations = collect_correlations(net, graph, [torch.randn(4, 3, 16, 16) for _ in range(2)])
    assert correlations["conv1"][0, 1] == pytest.approx(1.0, abs=1e-6)
    group, tp_group = conv1_group(graph)

    def removed(criterion: str, k: int) -> set[int]:
        scores = make_importance(criterion, net, correlations, beta=0.5)(tp_group).numpy()
        return set(np.argsort(scores, kind="stable")[:k].tolist())

    # the same four cuts: plain L1 takes both duplicates, the greedy exactly one of them
    assert {0, 1} <= removed("l1", 4)
    collaborative = removed("collaborative", 4)
    assert 2 in collaborative and len({0, 1} & collaborative) == 1
    # without the recomputation after each removal, the combined score takes both (of 3 cuts)
    assert {0, 1} <= removed("substitutability", 3)
    assert len({0, 1} & removed("collaborative", 3)) == 1


def test_collaborative_order_recomputes_partner_after_removal():
    c = np.array([0.6, 0.6, 0.5, 0.55, 1.0])
    r = np.eye(5)
    r[0, 1] = r[1, 0] = 1.0
    order = collaborative_removal_order(c, r, beta=0.5)
    assert order[0] in (0, 1)
    assert order[1] == 2  # the surviving duplicate is now irreplaceable: S rises to 0.6
    assert set(np.argsort(substitutability_scores(c, r, 0.5))[:2]) == {0, 1}


def test_pearson_matches_numpy():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 500))
    base[3] = 2.0 * base[0] + 0.1 * rng.normal(size=500)  # strongly correlated pair
    acc = CorrelationAccumulator(6)
    for chunk in np.array_split(base, 5, axis=1):
        acc.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(acc.correlation(), np.corrcoef(base), atol=1e-5)


def test_collected_correlation_equals_numpy_on_the_responses():
    torch.manual_seed(3)
    net = TwoLayerNet().eval()
    graph = PruningGraph(net, torch.zeros(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    corr = collect_correlations(net, graph, [x], positions_per_batch=10_000)["conv1"]
    with torch.no_grad():
        responses = net.bn1(net.conv1(x)).transpose(0, 1).reshape(8, -1).numpy()
    np.testing.assert_allclose(corr, np.corrcoef(responses), atol=1e-5)


def test_memory_bound_on_a_large_layer(monkeypatch):
    """Each batch contributes at most positions_per_batch columns; state is C x C."""
    seen = []
    original = CorrelationAccumulator.update

    def spy(self, samples):
        seen.append(tuple(samples.shape))
        original(self, samples)

    monkeypatch.setattr(CorrelationAccumulator, "update", spy)
    net = TwoLayerNet(width=64).eval()
    graph = PruningGraph(net, torch.zeros(1, 3, 32, 32))
    collect_correlations(net, graph, [torch.randn(4, 3, 128, 128)], positions_per_batch=1000)
    assert seen and all(cols <= 1000 and rows == 64 for rows, cols in seen)
    response = torch.randn(2, 5, 64, 64)
    sample = sample_positions(response, 300, torch.Generator().manual_seed(0))
    assert sample.shape == (5, 300)
    # the same (image, y, x) columns as drawing from the channels-first flattening
    idx = torch.randperm(2 * 64 * 64, generator=torch.Generator().manual_seed(0))[:300]
    torch.testing.assert_close(sample, response.transpose(0, 1).reshape(5, -1)[:, idx])


def test_every_criterion_is_a_torch_pruning_importance_with_one_score_per_channel():
    import torch_pruning as tp

    net = duplicate_filter_net()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    correlations = collect_correlations(net, graph, [torch.randn(2, 3, 16, 16)])
    _, tp_group = conv1_group(graph)
    for criterion in CRITERIA:
        importance = make_importance(criterion, net, correlations)
        assert isinstance(importance, tp.importance.Importance)
        assert importance(tp_group).shape == (8,)


def test_contribution_is_min_max_normalised_group_l1():
    net = duplicate_filter_net()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    _, tp_group = conv1_group(graph)
    c = ContributionImportance().contribution(tp_group)
    assert c.min() == 0.0 and c.max() == 1.0 and int(np.argmin(c)) == 2
    # group L1: conv1 filter + bn1 + conv2's input slice, all summed
    raw = (net.conv1.weight.abs().sum(dim=(1, 2, 3)) + net.bn1.weight.abs() + net.bn1.bias.abs()
           + net.conv2.weight.abs().sum(dim=(0, 2, 3))).detach().numpy()
    np.testing.assert_allclose(c, min_max(raw), atol=1e-5)


def test_weight_cosine_variant_sees_identical_filters():
    net = duplicate_filter_net()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    cos = weight_cosine_matrix(graph, graph.by_name["conv1"])
    assert cos[0, 1] == pytest.approx(1.0) and abs(cos[0, 3]) < 0.99


def test_weight_cosine_is_a_selectable_correlation_source_that_needs_no_data():
    from core.importance.scoring import score_filters

    net = duplicate_filter_net()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    analysis = score_filters(net, graph, "collaborative", [], correlation="weights")
    for g in graph.groups:
        np.testing.assert_array_equal(analysis.correlations[g.name], weight_cosine_matrix(graph, g))
    order = np.argsort(analysis.scores["conv1"], kind="stable")
    assert len({0, 1} & set(order[:4].tolist())) == 1  # the duplicates: one kept, as with responses
    with pytest.raises(Exception, match="unknown correlation source 'pixels'"):
        score_filters(net, graph, "collaborative", [], correlation="pixels")


def test_l1_criterion_is_torch_pruning_group_l1_unnormalised():
    import torch_pruning as tp

    net = duplicate_filter_net()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    _, tp_group = conv1_group(graph)
    expected = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)(tp_group)
    torch.testing.assert_close(make_importance("l1")(tp_group).float(), expected.float())


def test_group_analysis_lays_out_scores_and_both_selections():
    from core.importance.inspect import analyse_group

    net = duplicate_filter_net()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    torch.manual_seed(1)
    analysis = analyse_group(net, graph, "conv1", [torch.randn(4, 3, 16, 16) for _ in range(2)], beta=0.5, remove=4)
    assert analysis.abs_correlation.shape == (8, 8) and sorted(analysis.clustered_order) == list(range(8))
    # the duplicates sit side by side in the clustered order
    position = {int(f): i for i, f in enumerate(analysis.clustered_order)}
    assert abs(position[0] - position[1]) == 1
    assert {0, 1} <= set(analysis.removed_l1)
    assert len({0, 1} & set(analysis.removed_collaborative)) == 1
    assert analysis.overlap == len(set(analysis.removed_l1) & set(analysis.removed_collaborative))
    np.testing.assert_allclose(analysis.combined, analysis.contribution * (1 - 0.5 * analysis.substitutability))


def test_group_l1_sums_groupnorm_weights_too():
    """FPN's decoder normalises with GroupNorm; its scales count in a channel's group L1."""
    class GroupNormNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(4, 8)
            self.segmentation_head = nn.Sequential(nn.Conv2d(8, 2, 1))

        def forward(self, x):
            return self.segmentation_head(torch.relu(self.norm(self.conv(x))))

    net = GroupNormNet().eval()
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    group = graph.by_name["conv"]

    def l1() -> np.ndarray:
        return make_importance("l1")(graph.tp_group(group, range(group.channels))).numpy()

    before = l1()
    with torch.no_grad():
        net.norm.weight[2] += 5.0
    after = l1()
    np.testing.assert_allclose(after - before, np.eye(8)[2] * 5.0, atol=1e-5)
