"""bench/latency.py in-process with tiny settings: the report's rows (unpruned reference, one
pruned copy per allocator x rounding), their reductions and gain ratios, rounded widths, and the
--checkpoint mode on a checkpoint pruned by the engine."""

from __future__ import annotations


import pytest

from bench import latency as bench
import torch



def table_after(report: str, heading: str, caption: str | None = None) -> list[dict[str, str]]:
    """The first Markdown table after ``heading`` (and after ``caption`` within it), as dicts."""
    text = report.split(heading, 1)[1]
    if caption:
        text = text.split(caption, 1)[1]
    lines = [line for line in text.splitlines() if line.startswith("|")]
    block = []
    for line in text.splitlines()[text.splitlines().index(lines[0]):]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip("|").split("|")])
    header, rows = block[0], block[2:]
    return [dict(zip(header, row)) for row in rows]


def pct(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


TINY = ["--sizes", "64", "--runs", "2", "--warmup", "0", "--targets", "0.5", "--threads", "1",
        "--scoring-steps", "2", "--calibration-images", "4", "--table-grid", "2", "--table-repeats", "1"]


@pytest.mark.timeout(120)
def test_latency_report_rows(tmp_path, capsys):
    out = tmp_path / "latency.md"
    argv = [*TINY, "--round-to", "1", "8", "--table-folder", str(tmp_path / "tables"), "--out", str(out)]
    assert bench.main(argv) == 0
    report = out.read_text()
    assert "Command: `python bench/latency.py --sizes 64 --runs 2" in report
    assert "Machine: " in report and "Date 20" in report and "Drift: unpruned timed again" in report

    models = table_after(report, "## Models")
    assert [m["model"] for m in models] == ["unpruned", "uniform r1 50%", "uniform r8 50%",
                                            "scoring-network r1 50%", "scoring-network r8 50%"]
    assert pct(models[0]["MACs red."]) == 0.0 and float(models[0]["params M"]) > 10  # Unet-resnet18: 14 M
    for m in models[1:]:
        assert m["budget met"] == "yes"
        assert 0.49 <= pct(m["MACs red."]) <= 0.53  # the budget is met, rounding leaves little over
        assert 0.3 < pct(m["params red."]) < 0.9

    latency = table_after(report, "## 64 px", "Median ms")
    ratios = table_after(report, "## 64 px", "Latency gain / MACs gain")
    assert [r["model"] for r in latency] == [m["model"] for m in models]
    assert [r["model"] for r in ratios] == [m["model"] for m in models[1:]]
    base = {engine: float(latency[0][engine]) for engine in ("torch 1t", "ORT 1t")}
    for row, ratio in zip(latency[1:], ratios):
        for engine in ("torch 1t", "ORT 1t"):
            ms, gain = row[engine].split(" ")
            assert float(ms) > 0
            # ms are shown to 0.1 ms: allow for that rounding on both sides
            slack = 0.05 / base[engine] * (1 + float(ms) / base[engine]) + 1e-3
            assert pct(gain.strip("()")) == pytest.approx(1 - float(ms) / base[engine], abs=slack)
            assert float(ratio[engine].strip("*")) == pytest.approx(
                pct(gain.strip("()")) / pct(row["MACs red."]), abs=0.02)
    assert "## Does rounding help? (64 px)" in report
    assert "| uniform | 50.0% |" in report
    # the latency table's prediction beside each measurement, with its error
    predicted = table_after(report, "## Latency table: predicted against measured", "64 px: measured ms")
    assert [r["model"] for r in predicted] == [m["model"] for m in models]
    errors = []
    for row, timed in zip(predicted, latency):
        for engine in ("torch 1t", "ORT 1t"):
            measured, rest = row[engine].split(" / ")
            ms, error = rest.split(" ", 1)
            assert float(measured) == float(timed[engine].split(" ")[0]) and float(ms) > 0
            error = pct(error.strip("()*"))
            assert error == pytest.approx(float(ms) / float(measured) - 1, abs=0.01 + 0.06 / float(measured))
            errors.append(error)
    assert "Goal (predicted within 10% of measured): " in report and " of 8 pruned measurements" in report
    assert (tmp_path / "tables").is_dir()  # measured once, cached there
    capsys.readouterr()


def test_the_frontier_compares_the_fastest_equally_accurate_latency_model():
    args = bench.parse_args([*TINY, "--frontier", "--equal-accuracy", "1.0"])
    run = bench.FrontierRun
    runs = [run("unpruned", "-", 0.0, "b", 0.0, None, 60.0, None, {"torch": 100.0}, {"torch": "99-101"}),
            run("MACs-targeted", "macs", 0.8, "m", 0.8, None, 55.0, 54.0, {"torch": 40.0}, {"torch": "39-41"}),
            run("latency-targeted 60%", "latency", 0.6, "l6", 0.7, 30.0, 56.0, 55.0, {"torch": 38.0}, {"torch": "-"}),
            run("latency-targeted 80%", "latency", 0.8, "l8", 0.85, 20.0, 54.5, 53.0, {"torch": 30.0}, {"torch": "-"}),
            run("latency-targeted 85%", "latency", 0.85, "l9", 0.9, 15.0, 50.0, 49.0, {"torch": 20.0}, {"torch": "-"})]
    text = "\n".join(bench.frontier_lines(runs, args))
    # 85% is faster but 5 points worse: not equally accurate; 80% is within 1 point and 25% faster
    assert ("is latency-targeted 80%: 30.0 against 40.0 ms, 25.0% faster (goal at least 15%: met)") in text
    assert "| latency-targeted 85% | 90.0% | 15.00 | 20.0 (-) | 50.00 | 49.00 |" in text
    runs[3].val_miou = 40.0
    runs[2].val_miou = 40.0
    text = "\n".join(bench.frontier_lines(runs, args))
    assert "no latency-targeted model is within 1 point(s)" in text


def test_rounded_allocations_keep_multiples_of_eight():
    args = bench.parse_args([*TINY, "--round-to", "8", "--allocators", "uniform"])
    models = bench.engine_models(args)
    next(models)  # the unpruned model
    meta, pruned, spec = next(models)
    assert meta["round_to"] == 8
    from core.models.graph import PruningGraph

    graph = PruningGraph.traced(pruned, spec.input_size, spec.in_channels)
    widths = [g.channels for g in graph.groups if not g.feeds_classifier]
    assert widths and all(w % 8 == 0 for w in widths)
    assert {g.name: g.channels for g in graph.groups} == meta["kept"]


@pytest.mark.timeout(60)
def test_checkpoint_mode_times_the_given_checkpoint(tmp_path, capsys):
    from core.models.checkpoint import save_checkpoint
    from core.models.zoo import ModelSpec, build_model
    from core.pruning.methods import METHODS
    from core.pruning.step import prune_step, pruning_context

    spec = ModelSpec(classes=["background", "scratch"], in_channels=1, input_size=(64, 64))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    step = prune_step(pruning_context(model, spec.input_size, spec.in_channels, [], spec.classes),
                      METHODS["uniform-l1"], 0.6)
    save_checkpoint(tmp_path / "run" / "round_01", model, spec, step.history)
    out = tmp_path / "latency.md"
    assert bench.main([*TINY, "--engines", "torch", "--checkpoint", str(tmp_path / "run" / "round_01"),
                       "--out", str(out)]) == 0
    report = out.read_text()
    assert "--checkpoint" in report and "Models: the given checkpoints" in report
    models = table_after(report, "## Models")
    assert [m["model"] for m in models] == ["unpruned unet-resnet18", "run/round_01"]
    assert [m["allocator"] for m in models] == ["none", "checkpoint"]
    assert pct(models[1]["MACs red."]) == pytest.approx(0.6, abs=0.02)
    latency = table_after(report, "## 64 px", "Median ms")
    assert list(latency[0]) == ["model", "MACs red.", "torch 1t"]  # ORT not asked for
    capsys.readouterr()
