"""Compression benchmark: the method against every baseline on real defect data, one prune run
per method walking through every MACs target, the ablation of the method, and a control row.

    .venv/bin/python bench/compression.py [--datasets neu-seg magnetic-tile] [--format F --root DIR]
        [--arch unet] [--second-arch fpn --second-arch-dataset neu-seg] [--size 128]
        [--targets 0.5 0.7 0.8 0.9] [--methods ...] [--no-ablation] [--step 0.4]
        [--finetune-epochs 1] [--finetune-lr 0.001] [--scoring-steps 100] [--round-to 1]
        [--recover-epochs 0 [--recover-targets 0.8] [--recover-methods collaborative uniform-l1]]
        [--epochs 15 magnetic-tile=30] [--baseline-limit 1000] [--limit 500]
        [--jobs 2] [--threads 1] [--device auto]

For each dataset and architecture: the baseline is trained (or reused) by `bench/baseline.py`'s
cached `python -m core train` (early stopping on validation); every method runs `python -m core
prune` without the tolerance stop, its rounds landing on each target (`--milestones`), so one
run traces the whole frontier and nothing is retrained per target; each target's point is the
first round that reaches it, after its fine-tuning. The control row (`none`) fine-tunes the
unpruned model for as many epochs as a pruning run spends, and drops are taken against the
better of the baseline and the control. `--recover-epochs N` also fine-tunes chosen points and
the control N more epochs, to show how much of a drop is fine-tune budget.

Baselines, prune runs and fine-tunes run `--jobs` at a time (each with `--threads` torch
threads; a setting's runs start as soon as its baseline is trained): on a 2-core CPU two
one-thread jobs do about 1.3 times the work of one two-thread job. Measuring comes after, one
point at a time on the quiet machine. Test-split accuracy, checkpoint size and batch-1 CPU
latency (torch and ONNX Runtime, one thread, median of 30) are measured per point.

Resumable: prune runs resume from their last finished round (the loop's rounds.json, the same
record the run store's prune jobs resume from), and every measured point, the control and the
baselines are cached under `--work` (git-ignored), so rerunning the command continues where an
interrupted run stopped. Writes `compression.md`, `compression.csv` and `compression_frontier.png`
to `--out-dir`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.baseline import (  # noqa: E402
    CACHE_DEFAULT, SHARED_DEFAULT, EpochsAction, baseline_tag, benchmark_dataset, epochs_for, epochs_option,
    run_core, train_baseline,
)

DEFAULT_FINETUNE_LR = 1e-3  # TrainConfig's default, which every cached run used
METHODS = ["collaborative", "uniform-l1", "global-l1", "fpgm", "bn-scale", "random"]
# the ablation of the method, each step against uniform allocation; the last step is the method
ABLATION = [("l1", "uniform", "l1"), ("+ substitutability", "uniform", "substitutability"),
            ("+ collaborative removal", "uniform", "collaborative"),
            ("+ scoring-network allocation", None, None)]
STOPPING = threading.Event()  # set when the benchmark stops: in-process controls end their epoch loop
COLUMNS = ["dataset", "arch", "size", "method", "target", "defect_miou", "drop", "macs_reduction",
           "params_reduction", "size_bytes", "latency_torch_ms", "latency_ort_ms", "wall_s"]


@dataclass
class Run:
    label: str  # the CSV's method column
    method: str
    allocator: str | None = None
    criterion: str | None = None

    def resolved(self) -> tuple[str, str]:
        from core.pruning.methods import resolve_method

        spec = resolve_method(self.method, self.allocator, self.criterion)
        return spec.allocator, spec.criterion


def runs_for(methods: list[str], ablation: bool) -> tuple[list[Run], dict[str, str]]:
    """Every prune run to do (methods first, then the ablation steps no method already covers)
    and, per ablation step, the label of the run that holds it."""
    runs = [Run(m, m) for m in methods]
    steps: dict[str, str] = {}
    if ablation:
        by_setting = {r.resolved(): r.label for r in runs}
        for name, allocator, criterion in ABLATION:
            run = Run(f"{allocator}-{criterion}" if allocator else "collaborative", "collaborative", allocator, criterion)
            if run.resolved() not in by_setting:
                runs.append(run)
                by_setting[run.resolved()] = run.label
            steps[name] = by_setting[run.resolved()]
    return runs, steps


def common_args(args: argparse.Namespace) -> list[str]:
    out = ["--size", str(args.size), "--batch-size", str(args.batch_size), "--device", args.device]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.limit:
        out += ["--limit", str(args.limit)]
    return out


def prune(run: Run, checkpoint: Path, out: Path, args: argparse.Namespace,
          log: Path | None = None) -> tuple[dict, str]:
    targets = sorted(args.targets)
    command = ["prune", "--checkpoint", str(checkpoint), "--method", run.method, "--target-macs", str(targets[-1]),
               "--no-tolerance-stop", "--step", str(args.step),
               "--finetune-epochs", str(args.finetune_epochs), "--lr", str(args.finetune_lr),
               "--max-rounds", str(args.max_rounds),
               "--scoring-steps", str(args.scoring_steps), "--seed", str(args.seed), "--out", str(out),
               *common_args(args)]
    if run.allocator:
        command += ["--allocator", run.allocator]
    if run.criterion:
        command += ["--criterion", run.criterion]
    if len(targets) > 1:
        command += ["--milestones", *map(str, targets[:-1])]
    if args.round_to > 1:
        command += ["--round-to", str(args.round_to)]
    state = out / "rounds.json"
    finished = state.is_file() and "result" in json.loads(state.read_text())
    if not finished and not args.report_only:
        print(f"  {run.label}: python -m core {shlex.join(command)}", flush=True)
        run_core(command, log)  # resumes after the last finished round when interrupted before
    loaded = json.loads(state.read_text()) if state.is_file() else None  # partial with --report-only
    return loaded, "python -m core " + shlex.join(command)


def first_round(state: dict, target: float) -> tuple[dict, float] | None:
    """The first round of a run that reaches ``target`` and the run's wall time up to its end."""
    wall = 0.0
    for r in state["rounds"]:
        wall += r["wall_s"]
        if r["macs_reduction"] >= target - 1e-3:
            return r, wall
    return None


def recovery_jobs(label: str, state: dict | None, work: Path,
                  args: argparse.Namespace) -> list[tuple[float, str, Path]]:
    """``--recover-epochs``: (target, checkpoint, output folder) of the longer fine-tunes of a
    run's points, or of the control (label ``none``, target 0)."""
    n = args.recover_epochs
    if not n:
        return []
    if label == "none":
        return [(0.0, str(work / "none" / "checkpoint"), work / "none" / f"recover-e{n}")]
    if label not in args.recover_methods or state is None:
        return []
    hits = [(t, first_round(state, t)) for t in sorted(args.recover_targets)]
    return [(t, hit[0]["checkpoint"], work / label / f"recover-{t:g}-e{n}") for t, hit in hits if hit is not None]


def planned_rounds(targets: list[float], step: float) -> int:
    """Rounds a run takes through every target (the loop's schedule: a step of the remaining
    MACs, stopping at each milestone): what the control fine-tunes for."""
    left, rounds = 1.0, 0
    for target in sorted(targets):
        while 1.0 - left < target - 1e-3:
            left = max(left * (1.0 - step), 1.0 - target)
            rounds += 1
    return rounds


def measure(checkpoint: str | Path, test_ds, args: argparse.Namespace) -> dict:
    """Test defect mIoU, size and batch-1 latency of one checkpoint (cached beside it)."""
    from core.models.checkpoint import load_checkpoint
    from core.profile import checkpoint_size_bytes, export_onnx, measure_latency, measure_onnx_latency
    from core.train import evaluate

    cache = Path(f"{checkpoint}.bench.json")
    if cache.is_file():
        return json.loads(cache.read_text())
    loaded = load_checkpoint(checkpoint)
    model, spec = loaded.model.eval(), loaded.spec
    size, channels = tuple(spec.input_size), spec.in_channels
    metrics = evaluate(model, test_ds, batch_size=args.batch_size, class_names=spec.classes, per_image=False).metrics
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", size, channels)
        ort = measure_onnx_latency(onnx_path, size, channels, runs=args.latency_runs, threads=1).median_ms
    point = {"defect_miou": metrics.defect_miou, "per_class_iou": metrics.per_class_iou,
             "size_bytes": checkpoint_size_bytes(checkpoint), "latency_ort_ms": ort,
             "latency_torch_ms": measure_latency(model, size, channels, runs=args.latency_runs, threads=1).median_ms}
    cache.write_text(json.dumps(point, indent=2))
    return point


def fine_tune_copy(checkpoint: str | Path, epochs: int, out: Path, args: argparse.Namespace,
                   splits: dict | None = None) -> tuple[Path | None, float]:
    """A copy of ``checkpoint`` fine-tuned for ``epochs`` more epochs (cached in ``out``): the
    control (the unpruned model fine-tuned as long as a pruning run fine-tunes) and the longer
    fine-tunes of ``--recover-epochs``. The splits are built from the checkpoint when not given."""
    from core.models.checkpoint import load_checkpoint, save_checkpoint
    from core.train import TrainConfig, fine_tune

    lr = args.finetune_lr
    done = out / "fine_tune.json"
    if done.is_file() and (saved := json.loads(done.read_text()))["epochs"] == epochs and saved.get("lr", lr) == lr:
        return out / "checkpoint", saved["wall_s"]
    if args.report_only:
        return None, 0.0
    start = time.perf_counter()
    splits = splits or datasets_for(checkpoint, args)
    loaded = load_checkpoint(checkpoint)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, patience=None,
                         seed=args.seed, num_threads=args.threads, device=args.device)
    print(f"  {out.relative_to(args.work)}: fine-tuning {checkpoint} for {epochs} epoch(s)", flush=True)
    result = fine_tune(loaded.model, splits["train"], splits["val"], config, class_names=loaded.spec.classes,
                       progress=lambda _: STOPPING.is_set())
    if result.stopped_by_user:
        raise KeyboardInterrupt("the fine-tune was stopped with the benchmark")
    save_checkpoint(out / "checkpoint", loaded.model, loaded.spec, loaded.history)
    wall = time.perf_counter() - start
    done.write_text(json.dumps({"epochs": epochs, "lr": lr, "wall_s": wall}))
    return out / "checkpoint", wall


def datasets_for(checkpoint: Path, args: argparse.Namespace):
    from core.commands.evaluate import index_for_checkpoint
    from core.data.dataset import SegmentationDataset
    from core.models.checkpoint import read_spec

    spec = read_spec(checkpoint)
    index, _ = index_for_checkpoint(checkpoint, spec, None, None, None, None)
    size = tuple(spec.input_size)
    return {split: SegmentationDataset(index, split, size, spec.in_channels, augment=split == "train",
                                       seed=args.seed, limit=args.limit) for split in ("train", "val", "test")}


@dataclass
class Setting:
    """One dataset x architecture: its baseline and the prune runs on it."""
    fmt: str
    root: Path
    arch: str
    methods: list[str]
    ablation: bool

    def tag(self, args: argparse.Namespace) -> str:
        return (f"{self.fmt}-{self.arch}-{args.encoder}-{args.size}" + (f"-r{args.round_to}" if args.round_to > 1 else "")
                + (f"-lr{args.finetune_lr:g}" if args.finetune_lr != DEFAULT_FINETUNE_LR else ""))

    def baseline_args(self, args: argparse.Namespace) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), "arch": self.arch, "workers": 0, "lr": 1e-3,
                                     "limit": args.baseline_limit})


def train_all(settings: list[Setting], args: argparse.Namespace) -> None:
    """Train every baseline, prune run and control that is not cached yet, `--jobs` at a time.

    Longest first: baselines by epochs, then per setting the control and the runs as soon as its
    baseline is there. With more than one job, each command's progress goes to a log file beside
    its output and a bar counts finished jobs. A failed job stops the benchmark once the running
    ones end (their work stays cached, so a rerun continues)."""
    from tqdm.auto import tqdm

    def log(setting: Setting, name: str) -> Path | None:
        return args.work / setting.tag(args) / f"{name}.log" if args.jobs > 1 else None

    def count(setting: Setting) -> int:
        labels = [run.label for run in runs_for(setting.methods, setting.ablation)[0]]
        if not args.recover_epochs:
            return 2 + len(labels)
        return 3 + len(labels) + len(set(labels) & set(args.recover_methods)) * len(args.recover_targets)

    STOPPING.clear()
    jobs: dict = {}  # future -> (setting, job name, kind: baseline, control, run or recovery)
    total = sum(count(s) for s in settings)
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=total, desc="training jobs", unit="job") as bar:
        def submit(setting: Setting, name: str, kind: str, fn, *fn_args) -> None:
            jobs[pool.submit(fn, *fn_args)] = (setting, name, kind)

        for setting in sorted(settings, key=lambda s: -epochs_for(s.fmt, s.baseline_args(args))):
            submit(setting, "baseline", "baseline", train_baseline, setting.fmt, setting.root, setting.baseline_args(args),
                   args.baseline_cache, log(setting, "baseline"))
        try:
            while jobs:
                done, _ = wait(jobs, return_when=FIRST_COMPLETED)
                for future in done:
                    setting, name, kind = jobs.pop(future)
                    if future.exception() is not None:
                        bar.write(f"[{setting.tag(args)}] {name} failed; waiting for the running jobs to end")
                        raise future.exception()
                    bar.update()
                    bar.write(f"[{setting.tag(args)}] {name} done")
                    work = args.work / setting.tag(args)
                    if kind == "baseline":
                        checkpoint = future.result()[0]
                        epochs = planned_rounds(args.targets, args.step) * args.finetune_epochs
                        submit(setting, "none", "control", fine_tune_copy, checkpoint, epochs, work / "none", args)
                        for run in runs_for(setting.methods, setting.ablation)[0]:
                            submit(setting, run.label, "run", prune, run, checkpoint, work / run.label, args,
                                   log(setting, run.label))
                    elif kind in ("run", "control") and args.recover_epochs:  # its longer fine-tunes
                        state = future.result()[0] if kind == "run" else None
                        for target, checkpoint, out in recovery_jobs(name, state, work, args):
                            submit(setting, f"{name}@{target:g}+{args.recover_epochs}", "recovery", fine_tune_copy,
                                   checkpoint, args.recover_epochs, out, args)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            STOPPING.set()  # Ctrl-C reaches the commands too; the in-process control needs telling
            raise


def benchmark_setting(setting: Setting, args: argparse.Namespace) -> dict:
    """Measure and tabulate one setting (what `train_all` left cached; with --report-only, what
    is finished so far)."""
    fmt, root, arch, methods, ablation = setting.fmt, setting.root, setting.arch, setting.methods, setting.ablation
    tag = setting.tag(args)
    print(f"[{tag}] baseline", flush=True)
    base_args = setting.baseline_args(args)
    if args.report_only and not (args.baseline_cache / baseline_tag(fmt, base_args) / "training_history.json").is_file():
        print(f"[{tag}] no trained baseline yet: left out of the report", flush=True)
        return None
    baseline = benchmark_dataset(fmt, root, base_args, args.baseline_cache)
    checkpoint = Path(baseline["checkpoint"])
    splits = datasets_for(checkpoint, args)
    base = measure(checkpoint, splits["test"], args)
    runs, ablation_steps = runs_for(methods, ablation)
    results, commands = {}, {}
    for run in runs:
        state, commands[run.label] = prune(run, checkpoint, args.work / tag / run.label, args)
        if state is not None:
            results[run.label] = state
    rounds = planned_rounds(args.targets, args.step)
    control_ckpt, control_wall = fine_tune_copy(checkpoint, rounds * args.finetune_epochs, args.work / tag / "none",
                                                args, splits)
    ctrl = measure(control_ckpt, splits["test"], args) if control_ckpt else None
    reference = max(base["defect_miou"], ctrl["defect_miou"] if ctrl else base["defect_miou"])
    common = {"dataset": fmt, "arch": arch, "size": args.size}
    rows = [] if ctrl is None else [
        {**common, "method": "none", "target": 0.0, "defect_miou": ctrl["defect_miou"],
         "drop": reference - ctrl["defect_miou"], "macs_reduction": 0.0, "params_reduction": 0.0,
         "size_bytes": ctrl["size_bytes"], "latency_torch_ms": ctrl["latency_torch_ms"],
         "latency_ort_ms": ctrl["latency_ort_ms"], "wall_s": control_wall}]
    for label, state in results.items():
        for target in sorted(args.targets):
            hit = first_round(state, target)
            if hit is None:
                continue
            r, w = hit
            point = measure(r["checkpoint"], splits["test"], args)
            rows.append({**common, "method": label, "target": target, "defect_miou": point["defect_miou"],
                         "drop": reference - point["defect_miou"], "macs_reduction": r["macs_reduction"],
                         "params_reduction": r["params_reduction"], "size_bytes": point["size_bytes"],
                         "latency_torch_ms": point["latency_torch_ms"], "latency_ort_ms": point["latency_ort_ms"],
                         "wall_s": w})
    return {"tag": tag, "fmt": fmt, "arch": arch, "encoder": args.encoder, "size": args.size, "baseline": baseline, "base": base, "control": ctrl,
            "reference": reference, "rows": rows, "commands": commands, "ablation": ablation_steps,
            "rounds": rounds, "finished": {label: "result" in state for label, state in results.items()},
            "recovery": recovery(results, rows, base, splits["test"], args.work / tag, args)}


def recovery(results: dict, rows: list[dict], base: dict, test_ds, work: Path, args: argparse.Namespace) -> dict | None:
    """``--recover-epochs``: test defect mIoU of each chosen point (and of the control) before
    and after the longer fine-tune, drops against the best unpruned model including the control
    fine-tuned as much longer."""
    if not args.recover_epochs:
        return None
    before = {(r["method"], r["target"]): r for r in rows}
    points = []
    for label in ["none", *results]:
        for target, checkpoint, out in recovery_jobs(label, results.get(label), work, args):
            done, wall = fine_tune_copy(checkpoint, args.recover_epochs, out, args)
            if done is not None and (label, target) in before:
                points.append({**before[(label, target)], "after": measure(done, test_ds, args)["defect_miou"],
                               "recover_wall_s": wall})
    control = next((p["after"] for p in points if p["method"] == "none"), None)
    reference = max([base["defect_miou"], *(r["defect_miou"] for r in rows if r["method"] == "none"),
                     *([control] if control is not None else [])])
    return {"epochs": args.recover_epochs, "reference": reference, "points": points}


# ------------------------------------------------------------------ report
def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(setting: dict, targets: list[float]) -> list[str]:
    base = setting["base"]
    control = (f"control (`none`, {setting['rounds']} fine-tune epoch(s) without pruning) "
               f"{setting['control']['defect_miou']:.2f}" if setting["control"] else "control not run yet")
    unfinished = [label for label, done in setting["finished"].items() if not done]
    lines = [f"### {setting['fmt']}, {setting['arch']}-{setting['encoder']}, {setting['size']} px", "",
             f"Baseline test defect mIoU {base['defect_miou']:.2f} (torch {base['latency_torch_ms']:.1f} ms, "
             f"ORT {base['latency_ort_ms']:.1f} ms, {base['size_bytes'] / 1e6:.1f} MB); {control}; "
             f"drops against {setting['reference']:.2f}.", ""]
    if unfinished:
        lines += [f"**Unfinished runs (their finished rounds are shown): {', '.join(unfinished)}.**", ""]
    lines += [
             "| method | target | defect mIoU | drop | MACs red. | params red. | size MB | torch ms (gain) | ORT ms (gain) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in setting["rows"]:
        torch_gain = 1 - row["latency_torch_ms"] / base["latency_torch_ms"]
        ort_gain = 1 - row["latency_ort_ms"] / base["latency_ort_ms"]
        lines.append(f"| {row['method']} | {fmt_pct(row['target'])} | {row['defect_miou']:.2f} | {row['drop']:+.2f} | "
                     f"{fmt_pct(row['macs_reduction'])} | {fmt_pct(row['params_reduction'])} | "
                     f"{row['size_bytes'] / 1e6:.2f} | {row['latency_torch_ms']:.1f} ({fmt_pct(torch_gain)}) | "
                     f"{row['latency_ort_ms']:.1f} ({fmt_pct(ort_gain)}) | {row['wall_s']:.0f} |")
    return lines + [""]


def recovery_table(setting: dict) -> list[str]:
    rec = setting.get("recovery")
    if not rec or not rec["points"]:
        return []
    lines = [f"Longer fine-tune (`--recover-epochs {rec['epochs']}`: each point below fine-tuned {rec['epochs']} more "
             f"epoch(s) on the same split; drops against {rec['reference']:.2f}, the best of the baseline, the control "
             "and the control fine-tuned as much longer):", "",
             "| method | target | params red. | defect mIoU before | after | drop after | extra wall s |",
             "|---|---|---|---|---|---|---|"]
    for p in rec["points"]:
        lines.append(f"| {p['method']} | {fmt_pct(p['target'])} | {fmt_pct(p['params_reduction'])} | "
                     f"{p['defect_miou']:.2f} | {p['after']:.2f} | {rec['reference'] - p['after']:+.2f} | "
                     f"{p['recover_wall_s']:.0f} |")
    return lines + [""]


def findings(setting: dict, targets: list[float], main: str = "collaborative") -> list[str]:
    """The issue's goals, checked and said plainly (reported, never asserted)."""
    at = {(r["method"], r["target"]): r for r in setting["rows"]}
    lines = []
    goal = at.get((main, 0.8))
    if goal:
        ok = goal["params_reduction"] >= 0.9 and goal["drop"] <= 1.0
        lines.append(f"- At 80% fewer MACs, {main}: {fmt_pct(goal['params_reduction'])} fewer parameters, drop "
                     f"{goal['drop']:+.2f} points: goal (>= 90%, <= 1.0) {'met' if ok else 'NOT met'}.")
    methods = sorted({r["method"] for r in setting["rows"]} - {"none", main})
    for target in targets:
        if (main, target) not in at:
            continue
        ahead = [m for m in methods if (m, target) in at and at[(m, target)]["defect_miou"] >= at[(main, target)]["defect_miou"]]
        lines.append(f"- {fmt_pct(target)}: {main} {at[(main, target)]['defect_miou']:.2f}; "
                     + ("ahead of every other run." if not ahead else
                        "NOT ahead of " + ", ".join(f"{m} ({at[(m, target)]['defect_miou']:.2f})" for m in ahead) + "."))
    if setting["ablation"]:
        lines += ["", "Ablation (test defect mIoU per target; each step against uniform allocation):", "",
                  "| step | run | " + " | ".join(fmt_pct(t) for t in targets) + " |",
                  "|---|---|" + "---|" * len(targets)]
        for step, label in setting["ablation"].items():
            cells = [f"{at[(label, t)]['defect_miou']:.2f}" if (label, t) in at else "n/a" for t in targets]
            lines.append(f"| {step} | {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def frontier_png(settings: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        rows = setting["rows"]
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
            points = [(0.0, setting["base"]["defect_miou"])] + sorted(
                (r["macs_reduction"], r["defect_miou"]) for r in rows if r["method"] == method)
            ax.plot([100 * (1 - x) for x, _ in points], [y for _, y in points], marker="o",
                    linewidth=2.5 if method == "collaborative" else 1.2, label=method)
        ax.axhline(setting["reference"], color="grey", linestyle="--", linewidth=1, label="reference (best unpruned)")
        ax.set_xlabel("MACs left (% of the unpruned model)")
        ax.set_ylabel("test defect mIoU")
        ax.set_title(setting["tag"])
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(settings: list[dict], skipped: list[str], args: argparse.Namespace, argv: list[str], wall: float) -> str:
    targets = sorted(args.targets)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    lines = ["# Compression benchmark", "",
             "Command: `" + shlex.join(["python", "bench/compression.py", *argv]) + "`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, device {device}"
             f"{' (' + torch.cuda.get_device_name(0) + ')' if device == 'cuda' else ''}, training "
             f"{args.jobs} job(s) at a time, {args.threads} torch thread(s) each; latency at batch 1 on the CPU, 1 thread, median of "
             f"{args.latency_runs}. Wall time of this invocation {wall / 60:.1f} min (cached parts not redone). "
             f"Date {time.strftime('%Y-%m-%d')}.", "",
             f"Settings: step {args.step} of the remaining MACs per round, rounds landing on "
             f"{', '.join(fmt_pct(t) for t in targets)}; {args.finetune_epochs} fine-tune epoch(s) per round "
             f"(learning rate {args.finetune_lr:g}); "
             f"scoring network {args.scoring_steps} steps; pruning, fine-tuning and test on splits capped at "
             f"{args.limit or 'all'} images, baselines trained on splits capped at {args.baseline_limit or 'all'}; "
             f"seed {args.seed}"
             f"{f'; kept channels rounded to multiples of {args.round_to}' if args.round_to > 1 else ''}. "
             "MACs reduction targets; the point of a target is the first round reaching it.", ""]
    if args.limit:
        lines += [f"**Reduced run: fine-tuning and validation on seeded samples of at most {args.limit} images "
                  "per split, to fit the CPU budget; not the paper's protocol.**", ""]
    lines += [f"- skipped: {s}" for s in skipped] + ([""] if skipped else [])
    for setting in settings:
        lines += table(setting, targets) + ["Findings:", ""] + findings(setting, targets) + recovery_table(setting)
        lines += ["Commands:", "", "```", setting["baseline"]["train_cmd"],
                  *setting["commands"].values(), "```", ""]
    lines += ["![frontier](compression_frontier.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=["neu-seg", "magnetic-tile"], choices=["neu-seg", "magnetic-tile"])
    parser.add_argument("--data", type=Path, default=SHARED_DEFAULT, help="folder holding the shared datasets")
    parser.add_argument("--format", default=None, help="also run on a dataset of this format (with --root)")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--second-arch", default="fpn", help="second architecture ('' for none)")
    parser.add_argument("--second-arch-dataset", default="neu-seg")
    parser.add_argument("--second-arch-methods", nargs="+", default=["collaborative", "uniform-l1"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--no-ablation", dest="ablation", action="store_false")
    parser.add_argument("--report-only", action="store_true",
                        help="train and prune nothing: report what is finished (e.g. while a run goes on)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--step", type=float, default=0.4)
    parser.add_argument("--max-rounds", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-lr", type=float, default=DEFAULT_FINETUNE_LR,
                        help="learning rate of every fine-tune (pruning rounds and the control)")
    parser.add_argument("--recover-epochs", type=int, default=0,
                        help="also fine-tune chosen points and the control this many more epochs (0: off)")
    parser.add_argument("--recover-targets", nargs="+", type=float, default=[0.8])
    parser.add_argument("--recover-methods", nargs="+", default=["collaborative", "uniform-l1"])
    parser.add_argument("--scoring-steps", type=int, default=100)
    parser.add_argument("--round-to", type=int, default=1,
                        help="kept channel counts as multiples of this (bench/results/latency.md: 16 speeds CPUs up)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", nargs="+", action=EpochsAction, default=epochs_option(["15", "magnetic-tile=30"]),
                        metavar="N|FORMAT=N",
                        help="baseline epochs (early stopping on validation); FORMAT=N for one dataset")
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=500,
                        help="images per split for pruning, fine-tuning, the control and the test (0: all)")
    parser.add_argument("--baseline-limit", type=int, default=1000, help="images per split for the baselines (0: all)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings and prune runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each job")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--baseline-cache", type=Path, default=CACHE_DEFAULT, help="shared with bench/baseline.py")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "compression")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    args.limit, args.baseline_limit = args.limit or None, args.baseline_limit or None
    start = time.perf_counter()
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads take 1 or more")
    plan = [Setting(fmt, args.data / fmt, args.arch, args.methods, args.ablation) for fmt in args.datasets]
    if args.second_arch and args.second_arch_dataset in args.datasets:
        plan.append(Setting(args.second_arch_dataset, args.data / args.second_arch_dataset, args.second_arch,
                            args.second_arch_methods, False))
    if args.format:
        plan.append(Setting(args.format, Path(args.root) if args.root else args.work / "synthetic", args.arch,
                            args.methods, args.ablation))
    runnable, skipped = [], []
    for setting in plan:
        if not setting.root.exists() and not setting.fmt.startswith("synthetic"):
            skipped.append(f"{setting.fmt}: {setting.root} is absent (the real datasets live in ../shared/datasets)")
            print(f"[{setting.fmt}] skipped: {skipped[-1]}", flush=True)
        else:
            runnable.append(setting)
    if not args.report_only:
        threads = torch.get_num_threads()
        train_all(runnable, args)
        torch.set_num_threads(threads)  # in-process controls set it while they ran
    settings = [s for s in (benchmark_setting(setting, args) for setting in runnable) if s is not None]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "compression.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for setting in settings:
            for row in setting["rows"]:
                writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    if settings:
        frontier_png(settings, args.out_dir / "compression_frontier.png")
    (args.out_dir / "compression.md").write_text(report(settings, skipped, args, argv, time.perf_counter() - start))
    print(f"wrote {args.out_dir / 'compression.md'}", flush=True)
    return 0 if settings else 1


if __name__ == "__main__":
    raise SystemExit(main())
