"""ONNX Runtime's channel blocks in the latency table: grids at block multiples, counts read at
the next block multiple, an input count that is not a multiple of 4 paying the unblocked
fallback's measured penalty (and not the scale that corrects blocked convs timed alone), and
tables of the old layout (or another block) measured again instead of misread."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from core.allocation import latency as lat
from core.allocation.latency import LatencyCostModel, LatencySettings, LatencyTable, build_table, grid_counts
from core.models.graph import PruningGraph

SIZE = 16


class TwoConvs(nn.Module):
    """1 -> 32 -> 4 channels: one prunable group (the first conv's outputs, the second's inputs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.segmentation_head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.segmentation_head(torch.relu(self.bn(self.conv(x))))


def ms_at(cin: float, cout: float) -> float:
    return 0.05 + 0.002 * cin + 0.003 * cout + 1e-4 * cin * cout


def synthetic_cost(tmp_path, engine: str, block: int, fallback_ratio: float = 1.25, model_share: float = 1.0,
                   in_model: float | None = None):
    """A cost model whose table is bilinear times on the grids ``build_table`` would measure with
    ``block``, each geometry's fallback timed ``fallback_ratio`` times its aligned time; the whole
    model takes ``model_share`` of its convs' time (1: it is its convs, no remainder). With
    ``in_model``, each conv timed inside the model took that many times its time alone."""
    model = TwoConvs().eval()
    graph = PruningGraph.traced(model, (SIZE, SIZE), 1)
    geometries = lat.conv_geometries(model, (SIZE, SIZE), 1)
    table = LatencyTable(LatencySettings(engine=engine, folder=str(tmp_path)), block=block)
    for g in geometries:
        counts_in, counts_out = lat._grid_for(g, 3, block)
        entry = {"in": counts_in, "out": counts_out, "ms": [[ms_at(i, o) for o in counts_out] for i in counts_in]}
        unaligned = lat._unaligned_in(g, block)
        if unaligned is not None:
            entry["unaligned"] = {"in": unaligned, "ms": fallback_ratio * ms_at(unaligned, g.out_channels)}
        table.entries.setdefault(g.key, []).append(entry)
    full = sum(ms_at(g.in_channels, g.out_channels) for g in geometries)
    if in_model is not None:
        table.models[lat.model_signature(model, geometries, (SIZE, SIZE))] = {
            "ms": model_share * full, "convs": {g.name: in_model * ms_at(g.in_channels, g.out_channels)
                                                 for g in geometries}}
    return graph, LatencyCostModel(graph, table, geometries, model_share * full)


def test_grids_of_a_blocked_engine_sit_at_block_multiples():
    assert grid_counts(64, 4) == [1, 22, 43, 64]  # PyTorch: evenly, as before
    assert grid_counts(64, 4, 8) == [1, 24, 40, 64]
    assert all(c % 16 == 0 for c in grid_counts(512, 8, 16)[1:])
    assert grid_counts(6, 4, 8) == [1, 6]  # under one block: the ends only
    assert lat.channel_block("torch") == lat.channel_block("onnxruntime") in (1, 8, 16)


def test_block_rounding_raises_an_unaligned_output_count_to_the_block_multiple(tmp_path):
    graph, cost = synthetic_cost(tmp_path, "onnxruntime", block=8)
    name = graph.groups[0].name
    # 27 kept: the first conv (1 input, under a block: blocked) pads its 27 outputs to 32; the
    # head reads 27 inputs, not a multiple of 4: the fallback, its exact time x 1.25
    assert cost.budget_of({name: 27}) == pytest.approx(ms_at(1, 32) + 1.25 * ms_at(27, 4))
    # 28 kept: a multiple of 4, blocked: the head's input padded to the block, as ONNX Runtime does
    assert cost.budget_of({name: 28}) == pytest.approx(ms_at(1, 32) + ms_at(32, 4))
    # a whole count composed in float arithmetic (28.0000032) is that count, not a fallback
    assert float(cost.budget(torch.tensor([28 / 32 + 1e-7], dtype=torch.float64))) == pytest.approx(
        cost.budget_of({name: 28}), rel=1e-5)
    # 24 kept: aligned all through, nothing rounded (the head's 4 outputs stay its full 4)
    assert cost.budget_of({name: 24}) == pytest.approx(ms_at(1, 24) + ms_at(24, 4))
    assert cost.latency0 == pytest.approx(ms_at(1, 32) + ms_at(32, 4))
    # without a block the same table is read at the exact counts
    _, plain = synthetic_cost(tmp_path, "onnxruntime", block=1)
    assert plain.budget_of({name: 27}) == pytest.approx(ms_at(1, 27) + ms_at(27, 4))
    # monotone between multiples of 4 (a multiple of 4 can be cheaper than the count below it,
    # as on the engine), and the gradient stays finite and positive
    for counts in (range(25, 28), range(29, 32)):
        times = [cost.budget_of({name: c}) for c in counts]
        assert all(b >= a for a, b in zip(times, times[1:]))
    keep = torch.full((len(graph.groups),), 0.7, dtype=torch.float64, requires_grad=True)
    cost.budget(keep).backward()
    assert torch.isfinite(keep.grad).all() and (keep.grad > 0).all()


def test_pytorch_reads_both_counts_at_the_next_block_multiple_and_never_falls_back(tmp_path):
    graph, cost = synthetic_cost(tmp_path, "torch", block=8)
    name = graph.groups[0].name
    assert cost.budget_of({name: 27}) == pytest.approx(ms_at(1, 32) + ms_at(32, 4))
    assert cost.budget_of({name: 25}) == cost.budget_of({name: 32})
    assert cost.budget_of({name: 24}) == pytest.approx(ms_at(1, 24) + ms_at(24, 4))
    times = [cost.budget_of({name: c}) for c in range(1, 33)]  # steps, never down
    assert all(b >= a for a, b in zip(times, times[1:])) and times[-1] > times[0]
    keep = torch.full((len(graph.groups),), 0.7, dtype=torch.float64, requires_grad=True)
    cost.budget(keep).backward()
    assert torch.isfinite(keep.grad).all() and (keep.grad > 0).all()


def test_a_fallback_faster_than_the_blocked_kernel_is_held_level(tmp_path):
    graph, cost = synthetic_cost(tmp_path, "onnxruntime", block=8, fallback_ratio=0.8)
    name = graph.groups[0].name
    assert cost.budget_of({name: 27}) == pytest.approx(ms_at(1, 32) + ms_at(27, 4))


def test_the_scale_for_convs_timed_alone_spares_the_fallback(tmp_path):
    """Where the convs timed alone add up to more than the model (a blocked ONNX Runtime conv timed
    alone also reorders its input and output, which the model does only where its layout
    changes), the convs are scaled down to the model; the fallback, which runs in the plain
    layout alone and in the model alike, is not."""
    graph, cost = synthetic_cost(tmp_path, "onnxruntime", block=8, model_share=0.8)
    name = graph.groups[0].name
    assert cost.conv_scale == pytest.approx(0.8) and cost.latency0 == pytest.approx(0.8 * (ms_at(1, 32) + ms_at(32, 4)))
    assert cost.budget_of({name: 28}) == pytest.approx(0.8 * (ms_at(1, 32) + ms_at(32, 4)))
    assert cost.budget_of({name: 27}) == pytest.approx(0.8 * ms_at(1, 32) + 1.25 * ms_at(27, 4))


def test_convs_slower_inside_the_model_keep_that_ratio_in_proportion_to_the_weights_kept(tmp_path):
    """PyTorch convs timed inside the model at twice their time alone: at full size the prediction
    is the model (no remainder left), and a cut conv's extra time shrinks with its weights."""
    graph, cost = synthetic_cost(tmp_path, "torch", block=1, model_share=2.0, in_model=2.0)
    name = graph.groups[0].name
    assert cost.rest_ms == pytest.approx(0.0) and cost.latency0 == pytest.approx(cost.model_ms)
    # 16 of 32 kept: the first conv keeps half its weights (1 -> 16), the head half (16 -> 4)
    assert cost.budget_of({name: 16}) == pytest.approx(1.5 * ms_at(1, 16) + 1.5 * ms_at(16, 4))
    times = [cost.budget_of({name: c}) for c in range(1, 33)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    # faster inside the model (0.6 of its time alone): that factor at every count, still monotone
    graph, faster = synthetic_cost(tmp_path, "torch", block=1, model_share=0.6, in_model=0.6)
    assert faster.budget_of({name: 16}) == pytest.approx(0.6 * (ms_at(1, 16) + ms_at(16, 4)))
    times = [faster.budget_of({name: c}) for c in range(1, 33)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    _, alone = synthetic_cost(tmp_path, "torch", block=1, model_share=2.0)  # no in-model times: as before
    assert alone.rest_ms == pytest.approx(alone.model_ms / 2) and alone._in_model is None


def test_a_pytorch_table_times_each_conv_inside_the_model(tmp_path):
    settings = LatencySettings(engine="torch", grid=2, repeats=1, warmup=0, folder=str(tmp_path))
    model = TwoConvs().eval()
    table, geometries, model_ms = build_table(model, (SIZE, SIZE), 1, settings)
    convs = table.models[lat.model_signature(model, geometries, (SIZE, SIZE))]["convs"]
    assert set(convs) == {"conv", "segmentation_head"} and all(v >= 0 for v in convs.values())
    assert sum(convs.values()) <= 2 * model_ms
    reloaded = LatencyTable.load(settings)  # kept in the file
    assert reloaded.models == table.models


def fake_timings(monkeypatch):
    calls = []
    monkeypatch.setattr(lat, "time_conv", lambda g, cin, cout, *a, **k: calls.append((g.key, cin, cout)) or 0.1)
    monkeypatch.setattr(lat, "time_model", lambda *a, **k: 1.0)
    return calls


def test_an_onnx_runtime_table_times_block_multiples_and_each_fallback_once(tmp_path, monkeypatch):
    monkeypatch.setattr(lat, "channel_block", lambda engine: 8)
    calls = fake_timings(monkeypatch)
    settings = LatencySettings(engine="onnxruntime", grid=3, repeats=1, warmup=0, folder=str(tmp_path))
    table, geometries, _ = build_table(TwoConvs().eval(), (SIZE, SIZE), 1, settings)
    head = next(g for g in geometries if g.name == "segmentation_head")
    assert {cin for key, cin, _ in calls if key == head.key} == {1, 16, 31, 32}  # grid 1, 16, 32 + fallback 31
    assert all(cout in (1, 4) for key, _, cout in calls if key == head.key)
    assert table.lookup(head)["unaligned"] == {"in": 31, "ms": 0.1}
    payload = json.loads(settings.path().read_text())
    assert payload["version"] == lat.TABLE_VERSION and payload["block"] == 8
    assert LatencyTable.load(settings).lookup(head)["unaligned"]["in"] == 31
    calls.clear()  # PyTorch: the same block multiples, no fallback timed
    torch_settings = LatencySettings(engine="torch", grid=3, repeats=1, warmup=0, folder=str(tmp_path))
    table, _, _ = build_table(TwoConvs().eval(), (SIZE, SIZE), 1, torch_settings)
    assert {cin for key, cin, _ in calls if key == head.key} == {1, 16, 32} and "unaligned" not in table.lookup(head)


def test_an_old_table_or_another_block_is_measured_again(tmp_path, monkeypatch):
    settings = LatencySettings(engine="onnxruntime", grid=2, repeats=1, warmup=0, folder=str(tmp_path))
    model = TwoConvs().eval()
    monkeypatch.setattr(lat, "channel_block", lambda engine: 8)
    calls = fake_timings(monkeypatch)
    build_table(model, (SIZE, SIZE), 1, settings)
    fresh = len(calls)
    payload = json.loads(settings.path().read_text())
    settings.path().write_text(json.dumps({**payload, "version": 1}))  # the layout before blocks
    table, _, _ = build_table(model, (SIZE, SIZE), 1, settings)
    assert table.measured == fresh + 1 and json.loads(settings.path().read_text())["version"] == lat.TABLE_VERSION
    monkeypatch.setattr(lat, "channel_block", lambda engine: 16)  # the same file read on an AVX-512 machine
    assert LatencyTable.load(settings).entries == {}
