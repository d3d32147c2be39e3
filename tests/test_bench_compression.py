"""bench/compression.py end to end on tiny synthetic data: the CSV the issue names, the report,
the frontier plot, and a rerun that picks up the cached work instead of pruning again."""

from __future__ import annotations

import argparse
import csv
import json
import threading
import time

import pytest

from bench import compression as bench



@pytest.mark.timeout(400)
def test_compression_benchmark_on_tiny_synthetic_data(tmp_path, capsys):
    argv = ["--datasets", "--format", "synthetic-steel", "--size", "64", "--limit", "8", "--baseline-limit", "8", "--epochs", "1",
            "--methods", "uniform-l1", "--targets", "0.3", "0.5", "--step", "0.3", "--scoring-steps", "2",
            "--latency-runs", "2", "--threads", "1", "--batch-size", "4", "--work", str(tmp_path / "work"),
            "--recover-epochs", "1", "--recover-targets", "0.5", "--recover-methods", "uniform-l1",
            "--baseline-cache", str(tmp_path / "base"), "--out-dir", str(tmp_path / "out")]
    assert bench.main(argv) == 0
    with open(tmp_path / "out" / "compression.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == bench.COLUMNS
    # the control row, then one point per target of the one method and of each ablation run
    assert rows[0]["method"] == "none" and float(rows[0]["macs_reduction"]) == 0.0
    runs = {r["method"] for r in rows[1:]}
    assert runs == {"uniform-l1", "uniform-substitutability", "uniform-collaborative", "collaborative"}
    for row in rows[1:]:
        assert float(row["macs_reduction"]) == pytest.approx(float(row["target"]), abs=0.01)
        assert 0 < float(row["params_reduction"]) < 1 and int(row["size_bytes"]) > 0
        assert float(row["latency_torch_ms"]) > 0 and float(row["latency_ort_ms"]) > 0
    reference = max(float(r["defect_miou"]) + float(r["drop"]) for r in rows)
    assert all(float(r["defect_miou"]) + float(r["drop"]) == pytest.approx(reference) for r in rows)
    report = (tmp_path / "out" / "compression.md").read_text()
    assert "python bench/compression.py --datasets --format synthetic-steel" in report
    assert "| + scoring-network allocation | collaborative |" in report
    assert (tmp_path / "out" / "compression_frontier.png").stat().st_size > 1000
    # --recover-epochs: uniform-l1's 50% point and the control, each fine-tuned once more
    recovered = report.split("Longer fine-tune (`--recover-epochs 1`")[1].split("\n\n")[1].splitlines()[2:]
    assert [line.split(" | ")[:2] for line in recovered] == [["| none", "0.0%"], ["| uniform-l1", "50.0%"]]
    assert (tmp_path / "work" / "synthetic-steel-unet-resnet18-64" / "uniform-l1" / "recover-0.5-e1" / "checkpoint").is_dir()
    capsys.readouterr()

    # a rerun prunes nothing again: every run, point and the control come from the cache
    assert bench.main(argv) == 0
    assert "python -m core prune" not in capsys.readouterr().out
    with open(tmp_path / "out" / "compression.csv") as handle:
        assert list(csv.DictReader(handle)) == rows

    # --report-only while a run is unfinished: its finished rounds are reported, nothing runs
    state = tmp_path / "work" / "synthetic-steel-unet-resnet18-64" / "uniform-l1" / "rounds.json"
    unfinished = json.loads(state.read_text())
    del unfinished["result"]
    unfinished["rounds"] = unfinished["rounds"][:1]
    state.write_text(json.dumps(unfinished))
    assert bench.main([*argv, "--report-only"]) == 0
    assert "python -m core prune" not in capsys.readouterr().out
    assert "**Unfinished runs (their finished rounds are shown): uniform-l1.**" in (
        tmp_path / "out" / "compression.md").read_text()
    with open(tmp_path / "out" / "compression.csv") as handle:
        partial = [(r["method"], r["target"]) for r in csv.DictReader(handle)]
    assert ("uniform-l1", "0.3") in partial and ("uniform-l1", "0.5") not in partial


def test_planned_rounds_follow_the_loops_schedule():
    assert bench.planned_rounds([0.3, 0.5], 0.3) == 2  # 70% left, then 49% -> held at the 50% milestone
    assert bench.planned_rounds([0.5, 0.7, 0.8, 0.9], 0.4) == 6  # 60, 50, 30, 20, 12, 10% left


def test_prune_commands_carry_the_settings(tmp_path):
    args = argparse.Namespace(
        targets=[0.5, 0.8], step=0.4, finetune_epochs=1, finetune_lr=1e-4, max_rounds=10, scoring_steps=5, seed=0, size=64,
        batch_size=4, device="cpu", threads=1, limit=8, round_to=16, report_only=True)
    state, command = bench.prune(bench.Run("uniform-substitutability", "collaborative", "uniform", "substitutability"),
                                 tmp_path / "base", tmp_path / "run", args)
    assert state is None  # --report-only runs nothing
    assert command.startswith("python -m core prune --checkpoint")
    for part in ("--method collaborative", "--target-macs 0.8", "--milestones 0.5", "--round-to 16",
                 "--allocator uniform", "--criterion substitutability", "--lr 0.0001", "--no-tolerance-stop", "--limit 8"):
        assert part in command


def test_baseline_epochs_take_a_default_and_per_dataset_overrides():
    from bench.baseline import baseline_tag, epochs_option

    epochs = epochs_option(["15", "magnetic-tile=30"])
    args = argparse.Namespace(epochs=epochs, arch="unet", encoder="resnet18", size=128, seed=0, limit=1000)
    assert baseline_tag("neu-seg", args) == "neu-seg-unet-resnet18-128-e15-s0-l1000"
    assert baseline_tag("magnetic-tile", args) == "magnetic-tile-unet-resnet18-128-e30-s0-l1000"
    for bad in (["magnetic-tile=30"], ["fifteen"], ["15", "magnetic-tile=x"]):
        with pytest.raises(argparse.ArgumentTypeError):
            epochs_option(bad)


def _scheduling_args(tmp_path, jobs):
    return argparse.Namespace(
        jobs=jobs, work=tmp_path / "work", baseline_cache=tmp_path / "base", encoder="resnet18", size=64, round_to=1,
        finetune_lr=bench.DEFAULT_FINETUNE_LR, targets=[0.5], step=0.5, finetune_epochs=1, seed=0,
        epochs={None: 1, "synthetic-crack": 3}, baseline_limit=8, recover_epochs=0)


def _fake_jobs(monkeypatch, tmp_path, fail=None):
    """Replace the three kinds of job with timed no-ops that record when each ran."""
    lock, running, events = threading.Lock(), [], []

    def job(name):
        with lock:
            running.append(name)
            events.append(("start", name, len(running)))
        time.sleep(0.05)
        with lock:
            running.remove(name)
            events.append(("end", name, len(running)))
        if name == fail:
            raise RuntimeError(f"{name} failed")

    def baseline(fmt, root, args, cache, log):
        job(f"{fmt}-{args.arch}/baseline")
        return tmp_path / fmt, [], False

    monkeypatch.setattr(bench, "train_baseline", baseline)
    monkeypatch.setattr(bench, "prune", lambda run, ckpt, out, args, log: job(f"{out.parent.name.split('-resnet')[0]}/{run.label}"))
    monkeypatch.setattr(bench, "fine_tune_copy", lambda ckpt, epochs, out, args: job(f"{out.parent.name.split('-resnet')[0]}/none"))
    return events


def test_jobs_run_side_by_side_and_each_run_waits_for_its_baseline(tmp_path, monkeypatch):
    events = _fake_jobs(monkeypatch, tmp_path)
    settings = [bench.Setting("synthetic-steel", tmp_path, "unet", ["uniform-l1", "random"], False),
                bench.Setting("synthetic-crack", tmp_path, "fpn", ["uniform-l1"], False)]
    bench.train_all(settings, _scheduling_args(tmp_path, jobs=2))
    started = [name for kind, name, _ in events if kind == "start"]
    assert sorted(started) == sorted(["synthetic-steel-unet/baseline", "synthetic-steel-unet/none",
                                      "synthetic-steel-unet/uniform-l1", "synthetic-steel-unet/random",
                                      "synthetic-crack-fpn/baseline", "synthetic-crack-fpn/none",
                                      "synthetic-crack-fpn/uniform-l1"])
    assert started[0] == "synthetic-crack-fpn/baseline"  # the baseline with the most epochs goes first
    assert max(count for _, _, count in events) == 2  # two at a time, never more
    order = [(kind, name) for kind, name, _ in events]
    for name in started:
        setting, job = name.split("/")
        if job != "baseline":
            assert order.index(("start", name)) > order.index(("end", f"{setting}/baseline"))


def test_a_failed_job_stops_the_queue_and_is_raised(tmp_path, monkeypatch):
    events = _fake_jobs(monkeypatch, tmp_path, fail="synthetic-steel-unet/none")
    settings = [bench.Setting("synthetic-steel", tmp_path, "unet", ["uniform-l1", "random"], False)]
    with pytest.raises(RuntimeError, match="none failed"):
        bench.train_all(settings, _scheduling_args(tmp_path, jobs=1))
    started = [name for kind, name, _ in events if kind == "start"]
    # the control fails; the run the worker had already taken ends, the queued one never starts
    assert started[:2] == ["synthetic-steel-unet/baseline", "synthetic-steel-unet/none"]
    assert "synthetic-steel-unet/random" not in started
