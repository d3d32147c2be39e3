"""`python -m core prune --target-latency MS` (and `--cost latency`) on a tiny checkpoint: the
run lands on the latency table's prediction; impossible or malformed targets are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_cli_train import assert_one_line_error, in_process
from test_train import write_tiny_neu_seg

LATENCY = ["--latency-grid", "2", "--latency-repeats", "1"]
CLASSES = ["background", "inclusion", "patches", "scratches"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 64 px Unet-resnet18 on a tiny NEU-Seg folder (what pruning reads)."""
    from core.models.checkpoint import save_checkpoint
    from core.models.zoo import ModelSpec, build_model

    root = write_tiny_neu_seg(tmp_path_factory.mktemp("neu"))
    spec = ModelSpec(classes=CLASSES, in_channels=1, input_size=(64, 64), dataset_format="neu-seg",
                     dataset_root=str(root))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet", build_model(spec).eval(), spec)


def predicted_ms(checkpoint: Path) -> tuple[float, float]:
    """The model's predicted ms and the smallest the limits allow, on the same table the CLI reads."""
    from core.allocation.base import AllocationLimits
    from core.allocation.latency import LatencySettings, latency_cost_model
    from core.models.checkpoint import load_checkpoint
    from core.models.graph import PruningGraph

    loaded = load_checkpoint(checkpoint)
    graph = PruningGraph.traced(loaded.model, (64, 64), 1)
    cost = latency_cost_model(graph, LatencySettings(grid=2, repeats=1))
    return cost.budget0, cost.smallest_ms(AllocationLimits())


def prune(capsys, checkpoint: Path, out: Path, *args: str):
    return in_process(capsys, "prune", "--checkpoint", str(checkpoint), "--method", "uniform-l1",
                      "--finetune-epochs", "0", "--batch-size", "3", "--calibration-images", "3", "--threads", "1",
                      "--no-tolerance-stop", *LATENCY, *args, "--out", str(out))


def test_a_latency_target_is_reached_on_the_tables_prediction(checkpoint, tmp_path, capsys):
    start, smallest = predicted_ms(checkpoint)
    target = max(start * 0.6, smallest * 1.2)
    out = tmp_path / "run"
    proc = prune(capsys, checkpoint, out, "--target-latency", f"{target:.3f}", "--step", "0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    state = json.loads((out / "rounds.json").read_text())
    assert state["base"]["settings"]["target_kind"] == "latency"
    assert state["base"]["settings"]["start_ms"] == pytest.approx(start, rel=1e-6)
    rounds = state["rounds"]
    predicted = [r["step"]["allocation"]["predicted"]["latency_ms"] for r in rounds]
    assert len(rounds) >= 2  # 30% of the predicted ms per round: two rounds or more to 60%
    assert all(b < a for a, b in zip(predicted, predicted[1:]))
    assert predicted[-1] <= float(f"{target:.3f}") * (1 + 1e-3)
    assert predicted[-1] >= float(f"{target:.3f}") * 0.9  # landed on it, not far past
    assert json.loads(proc.stdout)["result"]["macs_reduction"] > 0


def test_cost_latency_reads_the_reduction_as_a_latency_reduction(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    proc = prune(capsys, checkpoint, out, "--cost", "latency", "--target-macs", "0.3", "--step", "0.5")
    assert proc.returncode == 0, proc.stderr
    state = json.loads((out / "rounds.json").read_text())
    [only] = state["rounds"]
    assert only["step"]["allocation"]["predicted"]["latency_reduction"] == pytest.approx(0.3, abs=0.03)


def test_impossible_and_malformed_latency_targets_are_one_line_errors(checkpoint, tmp_path, capsys):
    start, smallest = predicted_ms(checkpoint)
    out = tmp_path / "o"
    for value, needle in (("nan", "positive"), ("-3", "positive"), ("0", "positive"), ("fast", "is not a number")):
        assert_one_line_error(prune(capsys, checkpoint, out, "--target-latency", value), "--target-latency", needle)
    assert_one_line_error(prune(capsys, checkpoint, out, "--target-latency", "5", "--target-macs", "0.5"),
                          "not allowed with")
    assert_one_line_error(prune(capsys, checkpoint, out, "--target-latency", "5", "--latency-grid", "20"),
                          "--latency-grid", "2 to 8")
    assert_one_line_error(prune(capsys, checkpoint, out, "--cost", "latency", "--target-params", "0.5"),
                          "--target-params cannot be reached with --cost latency")
    below = f"{smallest * 0.5:.4f}"
    assert_one_line_error(prune(capsys, checkpoint, out, "--target-latency", below),
                          f"--target-latency {float(below):g} ms is below", "the fastest this model can be cut to")
    assert_one_line_error(prune(capsys, checkpoint, out, "--target-latency", f"{start * 2:.3f}"),
                          "is not below the model's predicted")
    assert not (out / "rounds.json").exists()


def test_job_parameters_take_the_latency_target():
    from core.runs.kinds import job_request
    from core.services.request import ParameterError

    request = job_request("prune", {"checkpoint": "/x", "target_latency": 12.5, "latency_engine": "onnxruntime",
                                    "latency_threads": 2})
    assert request.target_latency == 12.5 and request.uses_latency
    settings = request.latency_settings()
    assert (settings.engine, settings.threads, settings.grid, settings.repeats) == ("onnxruntime", 2, 4, 5)
    assert job_request("prune", {"checkpoint": "/x"}).latency_settings() is None
    with pytest.raises(ParameterError, match="target_latency|--target-latency"):
        job_request("prune", {"checkpoint": "/x", "target_latency": float("nan")})
    score = job_request("score", {"checkpoint": "/x", "target_latency": 3.0})
    assert score.target_latency == 3.0 and score.step_settings().latency is not None
