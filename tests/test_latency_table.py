"""The latency cost model: a per-layer table measured on this machine (tiny grid, tiny model),
its interpolation, its cache, and the allocators budgeting milliseconds with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.allocation import latency as lat
from core.allocation.base import AllocationLimits
from core.allocation.baselines import allocate_uniform
from core.allocation.context import PruningContext, ScoringNetworkSettings, StepSettings
from core.allocation.latency import (
    LatencyCostModel, LatencySettings, LatencyStopped, LatencyTable, LatencyTableError, build_table,
    cached_table, conv_geometries, grid_counts, model_signature,
)
from core.allocation.scoring_network import allocate_by_scoring_network, allocation_from_logits
from core.importance.scoring import GroupAnalysis
from core.models.graph import PruningGraph
from core.models.zoo import ModelSpec, build_model
from core.pruning.step import pruned_copy

SIZE = 32
CLASSES = ["background", "a", "b"]


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(classes=CLASSES, in_channels=1, input_size=(SIZE, SIZE))).eval()


def tiny_settings(folder, **more) -> LatencySettings:
    return LatencySettings(grid=2, repeats=1, warmup=0, folder=str(folder), **more)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A tiny model, its graph and a table measured for it (grid 2, one run per point)."""
    folder = tmp_path_factory.mktemp("tables")
    model = tiny_model()
    graph = PruningGraph.traced(model, (SIZE, SIZE), 1)
    reports = []
    settings = tiny_settings(folder)
    table, geometries, model_ms = build_table(model, (SIZE, SIZE), 1, settings,
                                              progress=lambda f, m: reports.append((f, m)) and False)
    return model, graph, settings, table, geometries, model_ms, reports


def test_the_table_is_measured_with_progress_and_written_per_machine(measured):
    model, graph, settings, table, geometries, model_ms, reports = measured
    assert table.measured > len(geometries) / 2  # shared geometries are timed once
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("timing layer geometry" in m for _, m in reports) and "timing the whole model" in [m for _, m in reports]
    path = settings.path()
    assert path.parent == settings.path().parent and path.name.endswith("-torch-1t.json")
    payload = json.loads(path.read_text())
    assert payload["cpu"] == lat.cpu_model() and payload["engine"] == "torch" and payload["threads"] == 1
    for g in geometries:
        entry = table.lookup(g)
        assert entry is not None and entry["in"][-1] >= g.in_channels and entry["out"][-1] >= g.out_channels
        assert all(v > 0 for row in entry["ms"] for v in row)
    assert model_ms > 0 and payload["models"][model_signature(model, geometries, (SIZE, SIZE))]["ms"] == model_ms


def test_a_second_build_measures_nothing(measured, monkeypatch):
    model, graph, settings, *_ = measured

    def no_timing(*args, **kwargs):
        raise AssertionError("the cached table was measured again")

    monkeypatch.setattr(lat, "time_conv", no_timing)
    monkeypatch.setattr(lat, "time_model", no_timing)
    table, _, _ = build_table(model, (SIZE, SIZE), 1, settings)
    assert table.measured == 0
    assert cached_table(model, (SIZE, SIZE), 1, settings) is not None
    # another thread count is another table: nothing cached for it
    assert cached_table(model, (SIZE, SIZE), 1, tiny_settings(settings.folder, threads=2)) is None


def test_the_prediction_is_the_measured_model_at_full_size_and_monotone_in_channels(measured):
    _, graph, _, table, geometries, model_ms, _ = measured
    cost = LatencyCostModel(graph, table, geometries, model_ms)
    assert cost.latency0 == pytest.approx(model_ms, rel=1e-9)
    assert cost.predict()["latency_reduction"] == pytest.approx(0.0, abs=1e-12)
    ratios = np.linspace(0.1, 1.0, 10)
    uniform = [float(cost.budget(torch.full((len(graph.groups),), float(r), dtype=torch.float64))) for r in ratios]
    assert all(b >= a - 1e-12 for a, b in zip(uniform, uniform[1:])) and uniform[-1] > uniform[0]
    for group in graph.groups[:4]:
        counts = range(1, group.channels + 1, max(1, group.channels // 7))
        times = [cost.budget_of({group.name: c}) for c in counts]
        assert all(b >= a - 1e-12 for a, b in zip(times, times[1:])), group.name
    keep = torch.full((len(graph.groups),), 0.5, dtype=torch.float64, requires_grad=True)
    cost.budget(keep).backward()  # the scoring network's pressure: differentiable in the keep ratios
    assert torch.isfinite(keep.grad).all() and (keep.grad >= 0).all() and keep.grad.sum() > 0


def synthetic_entry(g, points: int = 3) -> dict:
    """Times that are bilinear in the counts (a + b in + c out + d in out): interpolation must
    reproduce them exactly everywhere in the grid's range."""
    counts_in, counts_out = grid_counts(g.in_channels, points), grid_counts(g.out_channels, points)
    return {"in": counts_in, "out": counts_out,
            "ms": [[bilinear_ms(ci, co) for co in counts_out] for ci in counts_in]}


def bilinear_ms(cin: float, cout: float) -> float:
    return 0.05 + 0.002 * cin + 0.003 * cout + 1e-4 * cin * cout


def test_interpolation_is_exact_at_grid_points_and_between_them(tmp_path):
    model = tiny_model()
    graph = PruningGraph.traced(model, (SIZE, SIZE), 1)
    geometries = conv_geometries(model, (SIZE, SIZE), 1)
    table = LatencyTable(tiny_settings(tmp_path), block=1)  # exact counts (blocks: test_latency_blocks)
    for g in geometries:
        if table.lookup(g) is None:
            table.entries.setdefault(g.key, []).append(synthetic_entry(g))
    full = sum(bilinear_ms(g.in_channels, g.out_channels) for g in geometries)
    cost = LatencyCostModel(graph, table, geometries, full)  # the whole model = its convs: no remainder
    assert cost.rest_ms == pytest.approx(0.0, abs=1e-9) and cost.latency0 == pytest.approx(full)
    rng = np.random.default_rng(0)
    for _ in range(3):  # any kept counts: the sum over the really pruned model's convolutions
        kept = {g.name: int(rng.integers(1, g.channels + 1)) for g in graph.groups}
        pruned = pruned_copy(model, (SIZE, SIZE), 1, kept)
        expected = sum(bilinear_ms(g.in_channels, g.out_channels) for g in conv_geometries(pruned, (SIZE, SIZE), 1))
        assert cost.predict(kept)["latency_ms"] == pytest.approx(expected, rel=1e-7)  # float64 sums
    # at the grid points themselves a table that is not bilinear is read exactly
    gin, gout = np.array([1.0, 5.0, 9.0]), np.array([1.0, 4.0, 16.0])
    ms = np.array([[ci ** 2 + np.sqrt(co) for co in gout] for ci in gin])
    for i, ci in enumerate(gin):
        for j, co in enumerate(gout):
            assert lat._bilinear_np(gin, gout, ms, ci, co) == pytest.approx(ms[i, j])
    # and between two points along one axis it is the straight line between them
    assert lat._bilinear_np(gin, gout, ms, 3.0, 4.0) == pytest.approx((ms[0, 1] + ms[1, 1]) / 2)


def test_allocators_reach_a_latency_target_on_the_tables_prediction(measured):
    model, graph, _, table, geometries, model_ms, _ = measured
    cost = LatencyCostModel(graph, table, geometries, model_ms)
    target = 0.4
    uniform = allocate_uniform(graph, cost, target)
    assert uniform.budget_met
    reached = uniform.predicted["latency_reduction"]
    assert target - 1e-9 <= reached < target + 0.1, reached
    logits = np.random.default_rng(1).normal(size=len(graph.groups))
    learned = allocation_from_logits(graph, cost, logits, target)
    assert learned.budget_met and learned.predicted["latency_ms"] <= model_ms * (1 - target) + 1e-9
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 1, SIZE, SIZE, generator=g), torch.randint(0, 3, (2, SIZE, SIZE), generator=g))]
    context = PruningContext(model=model, graph=graph, cost=cost, batches=batches, class_names=CLASSES,
                             class_weights=[1.0] * 3, input_size=(SIZE, SIZE), in_channels=1,
                             settings=StepSettings(scoring=ScoringNetworkSettings(steps=3)))
    analysis = GroupAnalysis(scores={gr.name: np.arange(gr.channels, dtype=float) for gr in graph.groups},
                             correlations={})
    scored = allocate_by_scoring_network(context, analysis, target)
    assert scored.budget_met and scored.predicted["latency_ms"] <= model_ms * (1 - target) + 1e-9
    assert cost.smallest_ms(AllocationLimits()) < scored.predicted["latency_ms"]


def test_measuring_stops_through_its_progress_callback_and_keeps_what_it_measured(tmp_path):
    model = tiny_model()
    settings = tiny_settings(tmp_path)
    calls = []

    def stop_after_three(fraction, message):
        calls.append(message)
        return len(calls) > 3

    with pytest.raises(LatencyStopped, match="stopped after 3 of") as stopped:
        build_table(model, (SIZE, SIZE), 1, settings, progress=stop_after_three)
    total = int(str(stopped.value).split(" of ")[1].split()[0])
    # the first geometry (the image-fed conv: 1 input channel, 2 output counts) was finished and kept;
    # the second, timed part-way, was not
    kept = LatencyTable.load(settings)
    assert sum(len(v) for v in kept.entries.values()) == 1
    table, geometries, _ = build_table(model, (SIZE, SIZE), 1, settings)
    assert table.measured == total - 2
    assert cached_table(model, (SIZE, SIZE), 1, settings) is not None


def test_settings_are_bounded_and_named():
    for bad, needle in ((dict(grid=9), "2 to 8"), (dict(grid=1), "2 to 8"), (dict(repeats=51), "1 to 50"),
                        (dict(repeats=0), "1 to 50"), (dict(engine="tvm"), "torch, onnxruntime"),
                        (dict(threads=0), "from 1")):
        with pytest.raises(LatencyTableError, match=needle):
            LatencySettings(**bad).validate()


def test_an_unreadable_table_file_is_a_named_error(tmp_path):
    settings = tiny_settings(tmp_path)
    settings.path().parent.mkdir(parents=True, exist_ok=True)
    settings.path().write_text(json.dumps({"version": lat.TABLE_VERSION, "block": 1,
                                           "entries": {"conv": [{"in": [1], "out": [2], "ms": "x"}]}}))
    with pytest.raises(LatencyTableError, match="is not a latency table; delete it"):
        LatencyTable.load(settings)
    settings.path().write_text("{not json")
    with pytest.raises(LatencyTableError, match="is not valid JSON"):
        LatencyTable.load(settings)


def test_onnx_runtime_tables_are_their_own(tmp_path):
    model = tiny_model()
    settings = tiny_settings(tmp_path, engine="onnxruntime")
    table, geometries, model_ms = build_table(model, (SIZE, SIZE), 1, settings)
    assert settings.path().name.endswith("-onnxruntime-1t.json") and table.measured > 0 and model_ms > 0
    cost = LatencyCostModel(PruningGraph.traced(model, (SIZE, SIZE), 1), table, geometries, model_ms)
    assert cost.latency0 == pytest.approx(model_ms)
