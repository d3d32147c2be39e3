"""bench/compression.py end to end on tiny synthetic data (two seeds, the round and recovered
phases, the paired statistics, the CSV the issue names, the report, the frontier plot, and a
rerun that picks up the cached work instead of pruning again), and its parts one by one."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import threading
import time

import pytest

from bench import compression as bench
from bench.resume_copy import copy_matches, truncated_copy


@pytest.mark.timeout(400)
def test_compression_benchmark_on_tiny_synthetic_data(tmp_path, capsys):
    argv = ["--datasets", "--format", "synthetic-steel", "--size", "64", "--limit", "8", "--baseline-limit", "8",
            "--epochs", "1", "--methods", "collaborative", "uniform-l1", "--seeds", "0", "1",
            "--seeded-methods", "uniform-l1", "--no-ablation", "--targets", "0.3", "0.5", "--step", "0.3",
            "--scoring-steps", "2", "--latency-runs", "2", "--threads", "1", "--batch-size", "4",
            "--recover-epochs", "1", "--recover-targets", "0.3", "--work", str(tmp_path / "work"),
            "--baseline-cache", str(tmp_path / "base"), "--out-dir", str(tmp_path / "out")]
    assert bench.main(argv) == 0
    with open(tmp_path / "out" / "compression.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == bench.COLUMNS
    # the controls first: the round budget, then the recovery's schedule
    assert [(r["method"], r["phase"]) for r in rows[:2]] == [("none", "round"), ("none", "recovered")]
    assert all(float(r["macs_reduction"]) == 0.0 for r in rows[:2])
    # one row per method x target x seed x phase (recovered at 30% only: --recover-targets)
    keys = sorted((r["method"], r["target"], r["seed"], r["phase"]) for r in rows[2:])
    assert keys == sorted([(m, t, s, "round") for m in ("collaborative", "uniform-l1") for t in ("0.3", "0.5")
                           for s in ("0", "1")] + [(m, "0.3", s, "recovered") for m in ("collaborative", "uniform-l1")
                                                   for s in ("0", "1")])
    by_key = {(r["method"], r["target"], r["seed"], r["phase"]): r for r in rows}
    for row in rows[2:]:
        assert float(row["macs_reduction"]) == pytest.approx(float(row["target"]), abs=0.01)
        assert 0 < float(row["params_reduction"]) < 1 and int(row["size_bytes"]) > 0
        assert float(row["latency_torch_ms"]) > 0 and float(row["latency_ort_ms"]) > 0
        assert 0.0 <= float(row["miou_all"]) <= 100.0
        if row["phase"] == "recovered":  # the round's architecture: its latency, more wall time
            before = by_key[(row["method"], row["target"], row["seed"], "round")]
            assert row["latency_torch_ms"] == before["latency_torch_ms"]
            assert row["params_reduction"] == before["params_reduction"]
            assert float(row["wall_s"]) > float(before["wall_s"])
    reference = max(float(r["defect_miou"]) + float(r["drop"]) for r in rows)
    assert all(float(r["defect_miou"]) + float(r["drop"]) == pytest.approx(reference) for r in rows)
    # miou_all is the mean IoU over every class, background included
    work = tmp_path / "work" / bench.Setting("synthetic-steel", tmp_path, "unet", [], False).tag(
        argparse.Namespace(size=64, encoder="resnet18", round_to=1, finetune_lr=bench.DEFAULT_FINETUNE_LR,
                           precision="auto", device="auto", distill_weight=0.0))
    cached = json.loads(bench.measure_cache(work / "none" / "checkpoint", argparse.Namespace(work=tmp_path / "work"))
                        .read_text())
    # measurements are cached outside the prune runs' folders, which hold the loop's files alone
    for folder in (work / "uniform-l1").iterdir():
        assert all(n in ("rounds.json", "recovered") or n.startswith(".") or (n.startswith("round_") and n[6:].isdigit())
                   for n in (p.name for p in folder.iterdir())), folder
    values = [v for v in cached["per_class_iou"].values() if v is not None]
    assert len(cached["per_class_iou"]) == 4  # background and the three defect classes
    assert float(rows[0]["miou_all"]) == pytest.approx(sum(values) / len(values), abs=1e-4)

    # a target's recovered point: the run's folder copied up to the target's first round and
    # resumed; the copy at 30% holds round 1 of the run's 2 and recovered it
    run = work / "uniform-l1" / "s0"
    assert [r["round"] for r in json.loads((run / "rounds.json").read_text())["rounds"]] == [1, 2]
    copy = work / "uniform-l1" / "s0-recover-0.3-e1-lr0.001"
    state = json.loads((copy / "rounds.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1] and state["recovery"]["from_round"] == 1
    assert state["result"]["checkpoint"] == str(copy / "recovered") and "recovery" not in json.loads(
        (run / "rounds.json").read_text())
    assert state["recovery"]["epochs"] == 1 and (copy / "recovered").is_dir()
    assert not (work / "uniform-l1" / "s0-recover-0.5-e1-lr0.001").exists()
    assert (work / "none" / "recovered" / "checkpoint").is_dir()

    report = (tmp_path / "out" / "compression.md").read_text()
    assert "python bench/compression.py --datasets --format synthetic-steel" in report
    assert "| collaborative | 30.0% | recovered | 2 |" in report  # mean ± sd over two seeds
    assert "Baseline training:" in report and "the baselines' own training" in report
    # the paired difference collaborative - uniform-l1 at 30% after recovery, from the CSV's numbers
    miou = {k: float(r["defect_miou"]) for k, r in by_key.items()}
    diff = bench.paired_difference([miou[("collaborative", "0.3", s, "recovered")] for s in "01"],
                                   [miou[("uniform-l1", "0.3", s, "recovered")] for s in "01"])
    assert diff["n"] == 2
    assert f"| 30.0% | recovered | {bench.fmt_interval(diff)} |" in report
    assert (tmp_path / "out" / "compression_frontier.png").stat().st_size > 1000
    capsys.readouterr()

    # a rerun prunes nothing again: every run, recovery, point and control come from the cache
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "python -m core prune" not in out and "fine-tuning" not in out
    with open(tmp_path / "out" / "compression.csv") as handle:
        assert list(csv.DictReader(handle)) == rows

    # --report-only while a run is unfinished: its finished rounds are reported, nothing runs
    state_path = run / "rounds.json"
    unfinished = json.loads(state_path.read_text())
    del unfinished["result"]
    unfinished["rounds"] = unfinished["rounds"][:1]
    state_path.write_text(json.dumps(unfinished))
    assert bench.main([*argv, "--report-only"]) == 0
    assert "python -m core prune" not in capsys.readouterr().out
    assert "**Unfinished runs (their finished rounds are shown): uniform-l1 seed 0.**" in (
        tmp_path / "out" / "compression.md").read_text()
    with open(tmp_path / "out" / "compression.csv") as handle:
        partial = {(r["method"], r["target"], r["seed"], r["phase"]) for r in csv.DictReader(handle)}
    assert ("uniform-l1", "0.3", "0", "round") in partial and ("uniform-l1", "0.5", "0", "round") not in partial
    assert ("uniform-l1", "0.5", "1", "round") in partial and ("uniform-l1", "0.3", "0", "recovered") in partial


def test_paired_difference_with_its_t_interval():
    # differences 2, 3, 4: mean 3, sd 1, t(0.975, 2 df) = 4.302653 -> 3 -+ 4.302653 / sqrt(3)
    diff = bench.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert diff["mean"] == pytest.approx(3.0) and diff["sd"] == pytest.approx(1.0) and diff["n"] == 3
    assert diff["low"] == pytest.approx(3 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert diff["high"] == pytest.approx(5.484138, abs=1e-5)
    # by seed: only the seeds both ran are paired (0 and 2: differences 2 and 4, t(0.975, 1) = 12.7062)
    diff = bench.paired_difference({0: 3.0, 1: 5.0, 2: 7.0}, {0: 1.0, 2: 3.0})
    assert diff["seeds"] == [0, 2] and diff["sd"] == pytest.approx(math.sqrt(2))
    assert (diff["low"], diff["high"]) == (pytest.approx(3 - 12.7062047), pytest.approx(3 + 12.7062047))
    one = bench.paired_difference({0: 2.0}, {0: 1.5})
    assert one["mean"] == pytest.approx(0.5) and one["low"] is None and one["sd"] is None
    assert bench.paired_difference({0: 1.0}, {1: 1.0}) is None
    assert bench.mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2))) and bench.mean_sd([4.0]) == (4.0, None)
    assert bench.fmt_interval(bench.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])) == "+3.00 [+0.52, +5.48] (n=3)"


def test_planned_rounds_follow_the_loops_schedule():
    assert bench.planned_rounds([0.3, 0.5], 0.3) == 2  # 70% left, then 49% -> held at the 50% milestone
    assert bench.planned_rounds([0.5, 0.7, 0.8, 0.9], 0.4) == 6  # 60, 50, 30, 20, 12, 10% left
    assert bench.planned_rounds([0.5, 0.7, 0.8, 0.9, 0.95], 0.4) == 8  # then 6, 5% left


def _command_args(**extra):
    return argparse.Namespace(**{
        "targets": [0.5, 0.8], "step": 0.4, "finetune_epochs": 1, "finetune_lr": 1e-4, "max_rounds": 10,
        "scoring_steps": 5, "size": 64, "batch_size": 4, "device": "cpu", "threads": 1, "limit": 8, "round_to": 16,
        "report_only": True, "precision": "auto", "distill_weight": 0.0, "distill_temperature": 2.0,
        "recover_epochs": 10, "recover_lr": 1e-3, **extra})


def test_prune_commands_carry_the_settings(tmp_path):
    args = _command_args()
    run = bench.Run("uniform-substitutability", "collaborative", "uniform", "substitutability")
    state, command = bench.prune(run, tmp_path / "base", tmp_path / "run", args, seed=2)
    assert state is None  # --report-only runs nothing
    assert command.startswith("python -m core prune --checkpoint")
    for part in ("--method collaborative", "--target-macs 0.8", "--milestones 0.5", "--round-to 16", "--seed 2",
                 "--allocator uniform", "--criterion substitutability", "--lr 0.0001", "--no-tolerance-stop",
                 "--limit 8", "--precision auto", "--distill-weight 0", "--distill-temperature 2"):
        assert part in command
    assert "--recover-epochs" not in command  # the run itself: rounds only; each target is recovered on a copy
    # the recovery at 50%: the same run with the target reached, the recovery's settings
    recovery = " ".join(bench.prune_command(bench.Run(f"{bench.MAIN}-fp32", bench.MAIN, precision="fp32",
                                                      distill_weight=0.7), tmp_path / "base",
                                            tmp_path / "copy", args, 1, target=0.5))
    for part in ("--target-macs 0.5", "--recover-epochs 10", "--recover-lr 0.001", "--precision fp32",
                 "--distill-weight 0.7", "--seed 1"):
        assert part in recovery
    assert "--milestones" not in recovery
    assert bench.recovery_dir(tmp_path / "uniform-l1" / "s0", 0.5, args) == tmp_path / "uniform-l1" / "s0-recover-0.5-e10-lr0.001"


def test_runs_seeds_and_the_ablation_of_the_new_parts(monkeypatch):
    args = argparse.Namespace(seeds=[0, 1, 2], seeded_methods=["uniform-l1", "global-l1"], distill_weight=0.0,
                              ablation_distill_weight=0.7, recover_epochs=10, recover_targets=["0.8"],
                              targets=[0.5, 0.8], precision="auto", device="cpu")
    monkeypatch.setattr(bench, "run_precision", lambda args: "bf16")
    runs, steps = bench.runs_for(["collaborative", "uniform-l1", "global-l1", "fpgm"], True, args)
    seeds = {r.label: r.seeds for r in runs}
    assert seeds == {"collaborative": (0, 1, 2), "uniform-l1": (0, 1, 2), "global-l1": (0, 1, 2), "fpgm": (0,),
                     "uniform-substitutability": (0,), "uniform-collaborative": (0,), "collaborative-distill": (0,),
                     "collaborative-fp32": (0,)}
    assert steps == {"l1": ("uniform-l1", "recovered"), "+ substitutability": ("uniform-substitutability", "recovered"),
                     "+ collaborative removal": ("uniform-collaborative", "recovered"),
                     "+ scoring-network allocation": ("collaborative", "recovered"),
                     "recovery off (after the rounds)": ("collaborative", "round"),
                     "distillation on (weight 0.7)": ("collaborative-distill", "recovered"),
                     "fp32 instead of bf16": ("collaborative-fp32", "recovered")}
    by_label = {r.label: r for r in runs}
    assert by_label["collaborative-distill"].distill_weight == 0.7 and by_label["collaborative-fp32"].precision == "fp32"
    # distillation on by default: the ablation turns it off; an fp32 machine has no bf16 to compare
    monkeypatch.setattr(bench, "run_precision", lambda args: "fp32")
    runs, steps = bench.runs_for(["collaborative"], True, argparse.Namespace(**{**vars(args), "distill_weight": 0.5}))
    assert "distillation off" in steps and "fp32 instead of bf16" not in steps
    assert next(r for r in runs if r.label == "collaborative-no-distill").distill_weight == 0.0
    # recovery off: no recovered phase anywhere
    runs, steps = bench.runs_for(["collaborative"], True, argparse.Namespace(**{**vars(args), "recover_epochs": 0}))
    assert "recovery off (after the rounds)" not in steps and steps["l1"] == ("uniform-l1", "round")
    assert bench.recover_targets(argparse.Namespace(**{**vars(args), "recover_targets": ["all"]})) == [0.5, 0.8]


def test_sizes_per_dataset():
    from bench.baseline import format_values

    sizes = format_values(["128", "magnetic-tile=256"], "--size")
    args = argparse.Namespace(size=sizes)
    assert bench.size_for("magnetic-tile", args) == 256 and bench.size_for("neu-seg", args) == 128
    assert bench.extra_sizes(["magnetic-tile=128"]) == [("magnetic-tile", 128)]
    for bad in (["magnetic-tile=256"], ["big"]):
        with pytest.raises(argparse.ArgumentTypeError):
            format_values(bad, "--size")
    with pytest.raises(SystemExit):
        bench.main(["--size", "magnetic-tile=256", "--report-only"])


def _fake_run(folder, rounds):
    folder.mkdir(parents=True)
    records = []
    for i in range(1, rounds + 1):
        (folder / f"round_{i:02d}").mkdir()
        (folder / f"round_{i:02d}" / "weights.safetensors").write_bytes(b"w" * i)
        records.append({"round": i, "macs": 100 - 10 * i, "params": 50 - i, "checkpoint": str(folder / f"round_{i:02d}")})
    (folder / "rounds.json").write_text(json.dumps({"base": {"fingerprint": "abc"}, "rounds": records,
                                                    "result": {"checkpoint": "x"}}))


def test_truncated_copy_keeps_the_rounds_up_to_one_and_links_them(tmp_path):
    _fake_run(tmp_path / "run", 3)
    copy = truncated_copy(tmp_path / "run", tmp_path / "copy", 2)
    state = json.loads((copy / "rounds.json").read_text())
    assert "result" not in state and state["base"] == {"fingerprint": "abc"}
    assert [r["checkpoint"] for r in state["rounds"]] == [str(copy / "round_01"), str(copy / "round_02")]
    assert not (copy / "round_03").exists()
    weights = copy / "round_02" / "weights.safetensors"
    assert weights.read_bytes() == b"ww" and os.stat(weights).st_ino == os.stat(tmp_path / "run" / "round_02" / "weights.safetensors").st_ino
    # kept as it is while it matches (a recovery may have finished in it), replaced when not
    (copy / "recovered").mkdir()
    assert truncated_copy(tmp_path / "run", tmp_path / "copy", 2) == copy and (copy / "recovered").is_dir()
    assert not copy_matches(tmp_path / "run", copy, 1)
    truncated_copy(tmp_path / "run", copy, 1)
    assert len(json.loads((copy / "rounds.json").read_text())["rounds"]) == 1 and not (copy / "recovered").exists()
    with pytest.raises(ValueError):
        truncated_copy(tmp_path / "run", tmp_path / "other", 4)


def _row(method, target, seed, phase, miou):
    return {"dataset": "d", "arch": "unet", "size": 64, "method": method, "target": target, "seed": seed,
            "phase": phase, "defect_miou": miou, "miou_all": miou + 10, "drop": 60.0 - miou, "macs_reduction": target,
            "params_reduction": 0.95, "size_bytes": 1e6, "latency_torch_ms": 2.0, "latency_ort_ms": 1.0,
            "wall_s": 10.0, "recovery": {"wall_s": 5.0}}


def test_report_tables_mean_sd_single_seed_marks_and_ablation():
    rows = [_row("collaborative", 0.8, s, p, m) for s, m in ((0, 50.0), (1, 54.0)) for p in ("round", "recovered")]
    rows += [_row("uniform-l1", 0.8, s, "recovered", m) for s, m in ((0, 49.0), (1, 51.0))]
    rows += [_row("collaborative-fp32", 0.8, 0, "recovered", 52.0)]
    setting = {"fmt": "d", "arch": "unet", "encoder": "resnet18", "size": 64, "tag": "d", "rows": rows,
               "base": {"defect_miou": 60.0, "miou_all": 70.0, "latency_torch_ms": 4.0, "latency_ort_ms": 2.0,
                        "size_bytes": 2e6},
               "controls": {}, "reference": 60.0, "rounds": 2, "finished": {("collaborative", 0): True},
               "methods": ["collaborative", "uniform-l1"], "baseline": {"reused": True},
               "seeds": {"collaborative": [0, 1], "uniform-l1": [0, 1], "collaborative-fp32": [0]},
               "training": {"dataset": {"train_images": 8, "val_images": 8}, "epochs_run": 3, "best_epoch": 2,
                            "stopped_early": True, "config": {"epochs": 60, "patience": 8}, "seconds": 60.0},
               "ablation": {"+ scoring-network allocation": ("collaborative", "recovered"),
                            "recovery off (after the rounds)": ("collaborative", "round"),
                            "fp32 instead of bf16": ("collaborative-fp32", "recovered")}}
    lines = "\n".join(bench.table(setting, [0.8]))
    assert "| collaborative | 80.0% | recovered | 2 | 52.00 ± 2.83 | 62.00 ± 2.83 | +8.00 ± 2.83 |" in lines
    assert "| collaborative-fp32 (1 seed) | 80.0% | recovered | 1 | 52.00 | 62.00 | +8.00 |" in lines
    assert "3 epoch(s) (best 2, stopped early; at most 60, patience 8)" in lines
    args = argparse.Namespace(targets=[0.8], seeded_methods=["uniform-l1"])
    # differences 1 and 3: mean 2, sd sqrt 2, t(0.975, 1) 12.706 -> [-10.71, +14.71]
    assert "| 80.0% | recovered | +2.00 [-10.71, +14.71] (n=2) |" in "\n".join(bench.comparison_table(setting, args))
    found = "\n".join(bench.findings(setting, [0.8], args))
    assert "- 80.0% (recovered): collaborative 52.00; NOT ahead of collaborative-fp32 (52.00)." in found
    assert "| recovery off (after the rounds) | collaborative | round | 50.00 |" in found  # the first seed
    assert "| fp32 instead of bf16 | collaborative-fp32 | recovered | 52.00 |" in found
    # a target without recovery shows its round point, marked
    setting["rows"].append(_row("collaborative-fp32", 0.5, 0, "round", 40.0))
    found = "\n".join(bench.findings(setting, [0.5, 0.8], args))
    assert "| fp32 instead of bf16 | collaborative-fp32 | recovered | 40.00† | 52.00 |" in found
    assert "† a target not recovered" in found


def test_baseline_epochs_take_a_default_and_per_dataset_overrides():
    from bench.baseline import baseline_tag, epochs_option

    epochs = epochs_option(["15", "magnetic-tile=30"])
    args = argparse.Namespace(epochs=epochs, arch="unet", encoder="resnet18", size=128, seed=0, limit=1000)
    assert baseline_tag("neu-seg", args) == "neu-seg-unet-resnet18-128-e15-s0-l1000"
    assert baseline_tag("magnetic-tile", args) == "magnetic-tile-unet-resnet18-128-e30-s0-l1000"
    for bad in (["magnetic-tile=30"], ["fifteen"], ["15", "magnetic-tile=x"]):
        with pytest.raises(argparse.ArgumentTypeError):
            epochs_option(bad)
    # the benchmark's baselines: every image, the shared seed, the dataset's own size
    setting = bench.Setting("magnetic-tile", None, "unet", [], False)
    base = setting.baseline_args(argparse.Namespace(epochs=epochs, encoder="resnet18", size={None: 128, "magnetic-tile": 256},
                                                    seeds=[3, 4], baseline_seed=0, baseline_limit=None,
                                                    precision="fp32", schedule="cosine", device="cpu"))
    assert baseline_tag("magnetic-tile", base) == "magnetic-tile-unet-resnet18-256-e30-s0"


def _scheduling_args(tmp_path, jobs):
    return argparse.Namespace(
        jobs=jobs, work=tmp_path / "work", baseline_cache=tmp_path / "base", encoder="resnet18", size=64, round_to=1,
        finetune_lr=bench.DEFAULT_FINETUNE_LR, targets=[0.5], step=0.5, finetune_epochs=1, seeds=[0],
        seeded_methods=[], epochs={None: 1, "synthetic-crack": 3}, baseline_limit=8, recover_epochs=0,
        precision="fp32", device="cpu", distill_weight=0.0, baseline_seed=0)


def _fake_jobs(monkeypatch, tmp_path, fail=None):
    """Replace the kinds of job with timed no-ops that record when each ran."""
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
        return None, None

    def baseline(fmt, root, args, cache, log):
        job(f"{fmt}-{args.arch}/baseline")
        return tmp_path / fmt, [], False

    def setting_of(out):
        return next(p.name for p in out.parents if "-resnet" in p.name).split("-resnet")[0]

    monkeypatch.setattr(bench, "train_baseline", baseline)
    monkeypatch.setattr(bench, "prune", lambda run, ckpt, out, args, log, seed: job(
        f"{setting_of(out)}/{run.label}-s{seed}"))
    monkeypatch.setattr(bench, "recover", lambda run, ckpt, folder, target, args, log, seed: job(
        f"{setting_of(folder)}/{run.label}-s{seed}@{target:g}"))
    monkeypatch.setattr(bench, "fine_tune_copy", lambda ckpt, epochs, out, args, **kw: job(
        f"{setting_of(out)}/{'none-recovered' if kw.get('recovery') else 'none'}"))
    return events


def test_jobs_run_side_by_side_and_each_run_waits_for_its_baseline(tmp_path, monkeypatch):
    events = _fake_jobs(monkeypatch, tmp_path)
    settings = [bench.Setting("synthetic-steel", tmp_path, "unet", ["uniform-l1", "random"], False),
                bench.Setting("synthetic-crack", tmp_path, "fpn", ["uniform-l1"], False)]
    bench.train_all(settings, _scheduling_args(tmp_path, jobs=2))
    started = [name for kind, name, _ in events if kind == "start"]
    assert sorted(started) == sorted(["synthetic-steel-unet/baseline", "synthetic-steel-unet/none",
                                      "synthetic-steel-unet/uniform-l1-s0", "synthetic-steel-unet/random-s0",
                                      "synthetic-crack-fpn/baseline", "synthetic-crack-fpn/none",
                                      "synthetic-crack-fpn/uniform-l1-s0"])
    assert started[0] == "synthetic-crack-fpn/baseline"  # the baseline with the most epochs goes first
    assert max(count for _, _, count in events) == 2  # two at a time, never more
    order = [(kind, name) for kind, name, _ in events]
    for name in started:
        setting, job = name.split("/")
        if job != "baseline":
            assert order.index(("start", name)) > order.index(("end", f"{setting}/baseline"))


def test_seeds_recoveries_and_the_recovered_control_are_scheduled(tmp_path, monkeypatch):
    events = _fake_jobs(monkeypatch, tmp_path)
    args = argparse.Namespace(**{**vars(_scheduling_args(tmp_path, jobs=2)), "seeds": [0, 1], "recover_epochs": 1,
                                 "recover_targets": ["all"], "targets": [0.3, 0.5], "recover_lr": 1e-3})
    bench.train_all([bench.Setting("synthetic-steel", tmp_path, "unet", ["collaborative", "random"], False)], args)
    started = [name.split("/")[1] for kind, name, _ in events if kind == "start"]
    assert sorted(started) == sorted(["baseline", "none", "none-recovered", "collaborative-s0", "collaborative-s1",
                                      "random-s0", *(f"{run}@{t}" for run in ("collaborative-s0", "collaborative-s1",
                                                                              "random-s0") for t in ("0.3", "0.5"))])
    order = [(kind, name.split("/")[1]) for kind, name, _ in events]
    assert order.index(("start", "none-recovered")) > order.index(("end", "none"))
    assert order.index(("start", "collaborative-s1@0.3")) > order.index(("end", "collaborative-s1"))


def test_a_failed_job_stops_the_queue_and_is_raised(tmp_path, monkeypatch):
    events = _fake_jobs(monkeypatch, tmp_path, fail="synthetic-steel-unet/none")
    settings = [bench.Setting("synthetic-steel", tmp_path, "unet", ["uniform-l1", "random"], False)]
    with pytest.raises(RuntimeError, match="none failed"):
        bench.train_all(settings, _scheduling_args(tmp_path, jobs=1))
    started = [name for kind, name, _ in events if kind == "start"]
    # the control fails; the run the worker had already taken ends, the queued one never starts
    assert started[:2] == ["synthetic-steel-unet/baseline", "synthetic-steel-unet/none"]
    assert "synthetic-steel-unet/random-s0" not in started
