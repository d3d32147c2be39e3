"""bench/training_speed.py: its timing part on a tiny size, and its report from known rows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import training_speed  # noqa: E402


def test_timing_part_fills_every_cell_and_resumes_from_its_cache(tmp_path):
    out = tmp_path / "report.md"
    argv = ["--parts", "timing", "--sizes", "64", "--threads", "1", "--steps", "1", "--work", str(tmp_path),
            "--out", str(out)]
    assert training_speed.main(argv) == 0
    rows = json.loads((tmp_path / "timing.json").read_text())
    assert {(r["precision"], r["memory_format"]) for r in rows} == {
        (p, f) for p in training_speed.PRECISIONS for f in training_speed.FORMATS}
    assert all(r["seconds"] > 0 for r in rows)
    text = out.read_text()
    assert "| 64 | 1 |" in text and "## Accuracy" not in text
    (tmp_path / "timing.json").write_text(json.dumps([{**r, "seconds": 1.0 if r["precision"] == "fp32" else 0.25}
                                                      for r in rows]))
    assert training_speed.main(argv) == 0  # nothing re-timed: the cache answers
    assert "| 1.000 s | 1.000 s | 0.250 s | 0.250 s | 4.00x |" in out.read_text()


def test_report_compares_the_precision_gap_with_the_seed_spread():
    args = argparse.Namespace(steps=5, epochs=8, limit=500)
    rows = [{"seed": s, "precision": p, "test": t, "epoch_seconds": e, "best_epoch": 8, "command": "c"}
            for s, p, t, e in [(0, "fp32", 60.0, 100), (0, "bf16", 59.5, 40), (1, "fp32", 62.0, 100),
                               (1, "bf16", 61.0, 40)]]
    text = training_speed.report([], rows, "neu-seg", args, [])
    assert "| 0 | 60.00 | 59.50 | -0.50 | 100 | 40 |" in text
    assert "fp32 2.00, bf16 1.50 points; mean bf16 - fp32 -0.75 points: within the fp32 seed spread" in text
    rows[3]["test"] = 50.0
    assert "BEYOND the fp32 seed spread" in training_speed.report([], rows, "neu-seg", args, [])
