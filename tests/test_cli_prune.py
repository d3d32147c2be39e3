"""`python -m core prune` end to end on a tiny checkpoint, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli_train import assert_one_line_error, core
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


def test_prune_refuses_bad_arguments_in_one_line(checkpoint, tmp_path):
    assert_one_line_error(core("prune", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")))
    proc = core("prune", "--checkpoint", str(checkpoint), "--target-macs", "1.5", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
