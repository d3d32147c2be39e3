"""`python -m core prune` end to end on a tiny checkpoint, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli_train import assert_one_line_error, core, in_process
from test_train import write_tiny_neu_seg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_tiny_neu_seg(tmp_path_factory.mktemp("neu"))
    out = tmp_path_factory.mktemp("ckpt") / "unet"
    proc = core("train", "--format", "neu-seg", "--root", str(root), "--size", "64", "--epochs", "1",
                "--batch-size", "3", "--threads", "1", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return out


def test_prune_reaches_the_target_and_reports_rounds(checkpoint, tmp_path):
    out = tmp_path / "pruned"
    proc = core("prune", "--checkpoint", str(checkpoint), "--method", "collaborative", "--target-macs", "0.5",
                "--step", "0.5", "--finetune-epochs", "1", "--batch-size", "3", "--scoring-steps", "2",
                "--calibration-images", "4", "--no-tolerance-stop", "--threads", "1", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert [r["round"] for r in payload["rounds"]] == [1]
    assert set(payload["rounds"][0]) == {"round", "macs", "params", "defect_miou", "drop"}
    result = payload["result"]
    assert {"checkpoint", "macs_reduction", "params_reduction", "defect_miou", "drop", "test"} <= set(result)
    assert result["macs_reduction"] == pytest.approx(0.5, abs=0.02)
    assert 0 < result["params_reduction"] < 1
    assert result["test"]["defect_miou"] is not None or result["test"]["undefined_classes"]
    evaluated = core("evaluate", "--checkpoint", result["checkpoint"], "--split", "test", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["defect_miou"] == pytest.approx(result["test"]["defect_miou"])


def test_prune_refuses_bad_arguments_in_one_line(checkpoint, tmp_path, capsys):
    assert_one_line_error(core("prune", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")))
    proc = core("prune", "--checkpoint", str(checkpoint), "--target-macs", "1.5", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for flag, value, needle in (("--distill-weight", "1.5", "from 0 to 1"), ("--recover-lr", "nan", "positive"),
                                ("--recover-epochs", "-2", "0 or more"), ("--precision", "fp16", "invalid choice"),
                                ("--distill-temperature", "0", "positive"), ("--lr", "inf", "positive")):
        proc = in_process(capsys, "prune", "--checkpoint", str(checkpoint), flag, value, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2, flag
        assert_one_line_error(proc, flag, needle)
    assert not (tmp_path / "o").exists()


def test_prune_with_recovery_and_distillation_reports_both_phases(checkpoint, tmp_path):
    out = tmp_path / "recovered-run"
    proc = core("prune", "--checkpoint", str(checkpoint), "--method", "uniform-l1", "--target-macs", "0.5",
                "--step", "0.5", "--finetune-epochs", "1", "--batch-size", "3", "--calibration-images", "4",
                "--no-tolerance-stop", "--threads", "1", "--recover-epochs", "1", "--distill-weight", "0.3",
                "--precision", "fp32", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    recovery = payload["recovery"]
    assert recovery["epochs"] == 1 and recovery["distill_weight"] == 0.3 and recovery["precision"] == "fp32"
    assert recovery["teacher_step_seconds"] > 0
    assert payload["result"]["checkpoint"] == recovery["checkpoint"] == str(out / "recovered")
    assert payload["result"]["pre_recovery"]["test"] is not None and payload["result"]["test"] is not None
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert rounds[0]["distill_weight"] == 0.3 and rounds[0]["precision"] == "fp32"
    text = core("prune", "--checkpoint", str(checkpoint), "--method", "uniform-l1", "--target-macs", "0.5",
                "--step", "0.5", "--recover-epochs", "1", "--distill-weight", "0.3", "--precision", "fp32",
                "--out", str(out))  # the finished run again: resumed, nothing redone, the recovery line printed
    assert text.returncode == 0, text.stderr
    assert "recovery: 1 epoch(s) on round 1 (lr 0.001, distillation 0.3, fp32)" in text.stdout


def test_job_parameters_take_the_new_options_and_refuse_bad_ones():
    from core.runs.kinds import job_request
    from core.services.request import ParameterError

    args = job_request("prune", {"checkpoint": "c", "recover_epochs": 3, "distill_weight": 0.5, "precision": "bf16"})
    assert (args.recover_epochs, args.distill_weight, args.precision) == (3, 0.5, "bf16")
    assert job_request("train", {"format": "neu-seg", "precision": "fp32"}).precision == "fp32"
    for bad in ({"precision": "fp64"}, {"distill_weight": 2}, {"recover_lr": -1}):
        with pytest.raises(ParameterError):
            job_request("prune", {"checkpoint": "c", **bad})


def _allocation_file(checkpoint: Path, folder: Path, scale: int = 1) -> tuple[Path, dict]:
    """An allocation file as the Layer importance page writes it: half of every group kept
    (``scale``: channel counts multiplied, as for another model)."""
    from core.models.checkpoint import load_checkpoint
    from core.models.graph import PruningGraph
    from core.pruning.step import FixedAllocation

    loaded = load_checkpoint(checkpoint)
    graph = PruningGraph.traced(loaded.model, tuple(loaded.spec.input_size), loaded.spec.in_channels)
    channels = {g.name: g.channels * scale for g in graph.groups}
    kept = {name: max(count // 2, 1) for name, count in channels.items()}
    path = folder / "allocation.json"
    path.write_text(json.dumps(FixedAllocation(kept=kept, channels=channels, allocator="uniform", target=0.5,
                                               checkpoint=str(checkpoint)).to_json()))
    return path, kept


def test_prune_with_a_fixed_allocation_cuts_its_first_round_to_it(checkpoint, tmp_path):
    allocation, kept = _allocation_file(checkpoint, tmp_path)
    out = tmp_path / "fixed"
    proc = core("prune", "--checkpoint", str(checkpoint), "--method", "uniform-l1", "--allocation", str(allocation),
                "--target-macs", "0.5", "--max-rounds", "1", "--finetune-epochs", "0", "--batch-size", "3",
                "--calibration-images", "4", "--no-tolerance-stop", "--threads", "1", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert rounds[0]["step"]["allocation"]["kept"] == kept


def test_prune_refuses_an_allocation_made_for_another_model_before_running(checkpoint, tmp_path):
    allocation, _ = _allocation_file(checkpoint, tmp_path, scale=2)
    out = tmp_path / "o"
    proc = core("prune", "--checkpoint", str(checkpoint), "--allocation", str(allocation), "--out", str(out))
    assert_one_line_error(proc, "was made for another model")
    assert not (out / "rounds.json").exists()
    assert_one_line_error(core("prune", "--checkpoint", str(checkpoint), "--allocation", str(tmp_path / "none.json"),
                               "--out", str(out)), "none.json cannot be read")
