"""Compression benchmark: the method against the strongest baselines on real defect data over
several seeds, one prune run per method and seed walking through every MACs target, each
target's point after the loop's final recovery phase, the ablation of the method, and controls.

    .venv/bin/python bench/compression.py [--datasets neu-seg magnetic-tile] [--format F --root DIR]
        [--arch unet] [--second-arch fpn --second-arch-dataset neu-seg] [--size 128 [magnetic-tile=256]]
        [--extra-sizes magnetic-tile=128] [--targets 0.5 0.7 0.8 0.9 0.95] [--methods ...]
        [--seeds 0 1 2] [--seeded-methods uniform-l1 global-l1] [--no-ablation] [--step 0.4]
        [--finetune-epochs 1] [--finetune-lr 0.001] [--scoring-steps 100] [--round-to 1]
        [--precision auto] [--distill-weight 0] [--distill-temperature 2]
        [--recover-epochs 10] [--recover-lr 0.001] [--recover-targets 0.8 0.9 0.95 | all]
        [--epochs 60] [--patience 8] [--baseline-limit 0] [--limit 500]
        [--jobs 2] [--threads 1] [--device auto] [--ray auto | local | ADDRESS] [--ray-cpus N]

For each dataset, size and architecture: the baseline is trained (or reused) by
`bench/baseline.py`'s cached `python -m core train` until validation stops improving (early
stopping with `--patience`, at most `--epochs`), on every training image by default, in
`--precision`. Every method and seed runs `python -m core prune` without the tolerance stop,
its rounds landing on each target (`--milestones`), so one run traces the whole frontier: a
target's `round` point is the first round that reaches it, after its fine-tuning. Its
`recovered` point is the loop's own final recovery phase (`--recover-epochs`, warm-up + cosine,
`--recover-lr`, best validation epoch kept) on that round: the loop recovers only its final
result, so a copy of the run's folder truncated to the rounds up to that target is resumed with
the target reached (`bench/resume_copy.py`), and the loop goes straight to the recovery.

The method (`collaborative`) and `--seeded-methods` run once per `--seeds` (the pruning and
fine-tuning seed; the baseline is shared); the other methods and the ablation runs once, with
the first seed. The report gives mean and standard deviation per point and, per target and
phase, the paired per-seed difference of the method minus each seeded baseline with its 95%
interval (t distribution). The controls (`none`) fine-tune the unpruned model as a run's rounds
do (`round`: as many epochs as a run's rounds spend), then as its recovery does (`recovered`:
`--recover-epochs` more with the recovery's schedule and rate); drops are taken against the best
of the baseline and the controls. The ablation (one seed): the criterion and allocation steps,
the recovery phase off (the `round` phase), distillation flipped, fp32 instead of bf16.

Baselines, prune runs, recoveries and controls run `--jobs` at a time (each with `--threads`
torch threads; a setting's runs start as soon as its baseline is trained, a run's recoveries as
soon as the run ends): on a 2-core CPU two one-thread jobs do about 1.3 times the work of one
two-thread job. Measuring comes after, one point at a time on the quiet machine: test-split
accuracy (taken from the loop's own test evaluation where it made one), checkpoint size and
batch-1 CPU latency (torch and ONNX Runtime, one thread, median of `--latency-runs`; a
recovered point has its round's architecture, so its latency is the round's).

With `--ray ADDRESS` every baseline, prune run, recovery, control and measurement is a Ray
task instead (`auto`: the cluster `ray start --head` runs on this machine; `local`: a cluster of
`--ray-cpus` started here for this invocation): a training task asks for `--threads` CPUs and,
where it trains on CUDA, one GPU; a measurement one CPU (so, unlike the local path, latencies
are measured side by side). The same caches decide what runs: a job or point whose output
exists is never submitted. The repository, `--work` and `--baseline-cache` must be at the same
paths on every node (a shared file system). Without `--ray` nothing imports Ray.

Resumable: prune runs and recoveries resume from their last finished round (the loop's
rounds.json, the same record the run store's prune jobs resume from), and every measured point,
the controls and the baselines are cached under `--work` (git-ignored), so rerunning the command
continues where an interrupted run stopped; `--report-only` runs nothing and reports what is
finished. Writes `compression.md`, `compression.csv` and `compression_frontier.png` to
`--out-dir`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
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
    CACHE_DEFAULT, SHARED_DEFAULT, FormatValuesAction, baseline_tag, benchmark_dataset, epochs_for, epochs_option,
    resolved_precision, run_core, train_baseline,
)
from bench.recovery_check import miou_all  # noqa: E402
from bench.resume_copy import copy_matches, truncated_copy  # noqa: E402

DEFAULT_FINETUNE_LR = 1e-3  # TrainConfig's default, which every cached run used
DEFAULT_DISTILL_TEMPERATURE = 2.0  # the CLI's default
RECOVER_WARMUP = 0.05  # the loop's recovery warm-up (LoopSettings.recover_warmup), used by the control
METHODS = ["collaborative", "uniform-l1", "global-l1", "fpgm", "bn-scale", "random"]
MAIN = "collaborative"
# the ablation of the method, each step against uniform allocation; the last step is the method
ABLATION = [("l1", "uniform", "l1"), ("+ substitutability", "uniform", "substitutability"),
            ("+ collaborative removal", "uniform", "collaborative"),
            ("+ scoring-network allocation", None, None)]
PHASES = ("round", "recovered")
STOPPING = threading.Event()  # set when the benchmark stops: in-process controls end their epoch loop
_PLANNED: list | None = None  # while `run_measurements` plans: the measurements `measure` was asked for
COLUMNS = ["dataset", "arch", "size", "method", "target", "seed", "phase", "defect_miou", "miou_all", "drop",
           "macs_reduction", "params_reduction", "size_bytes", "latency_torch_ms", "latency_ort_ms", "wall_s"]


# ------------------------------------------------------------------ statistics
def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for the deviation of fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_difference(a: dict | list, b: dict | list, confidence: float = 0.95) -> dict | None:
    """The paired difference a - b over the seeds both have (dicts seed -> value, or lists in
    seed order): mean, standard deviation, n and the ``confidence`` interval of the mean from
    the t distribution (None with fewer than two pairs)."""
    from scipy import stats

    if isinstance(a, dict):
        seeds = [s for s in a if s in b]
        diffs = [a[s] - b[s] for s in seeds]
    else:
        seeds = list(range(min(len(a), len(b))))
        diffs = [x - y for x, y in zip(a, b)]
    if not diffs:
        return None
    mean, sd = mean_sd(diffs)
    low = high = None
    if sd is not None:
        half = stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
    return {"mean": mean, "sd": sd, "n": len(diffs), "low": low, "high": high, "seeds": seeds, "diffs": diffs}


# ------------------------------------------------------------------ options
def extra_sizes(values: list[str]) -> list[tuple[str, int]]:
    pairs = []
    for value in values:
        fmt, _, size = value.partition("=")
        if not fmt or not size.isdigit():
            raise argparse.ArgumentTypeError(f"--extra-sizes takes FORMAT=N, not {value!r}")
        pairs.append((fmt, int(size)))
    return pairs


def size_for(fmt: str, args: argparse.Namespace) -> int:
    return args.size.get(fmt, args.size[None]) if isinstance(args.size, dict) else int(args.size)


def run_precision(args: argparse.Namespace) -> str:
    """The concrete precision of the prune runs (``--precision`` resolved on this machine)."""
    return resolved_precision(argparse.Namespace(precision=getattr(args, "precision", "fp32"),
                                                 device=getattr(args, "device", "auto")))


def recover_targets(args: argparse.Namespace) -> list[float]:
    """The targets whose point is recovered (``--recover-targets``, among ``--targets``)."""
    if not args.recover_epochs:
        return []
    wanted = args.recover_targets
    if wanted is None or "all" in [str(w) for w in wanted]:
        return sorted(args.targets)
    wanted = [float(w) for w in wanted]
    return [t for t in sorted(args.targets) if any(abs(t - w) < 1e-9 for w in wanted)]


# ------------------------------------------------------------------ runs
@dataclass
class Run:
    label: str  # the CSV's method column
    method: str
    allocator: str | None = None
    criterion: str | None = None
    precision: str | None = None  # ablation overrides of the benchmark's settings
    distill_weight: float | None = None
    seeds: tuple[int, ...] = (0,)

    def resolved(self) -> tuple[str, str]:
        from core.pruning.methods import resolve_method

        spec = resolve_method(self.method, self.allocator, self.criterion)
        return spec.allocator, spec.criterion


def ablation_extras(args: argparse.Namespace) -> list[tuple[str, Run]]:
    """The ablation steps of the new parts beside the criterion/allocation ones: distillation
    flipped and fp32 instead of bf16 (recovery off is the method's `round` phase)."""
    first = (args.seeds[0],)
    extras = []
    if args.distill_weight > 0:
        extras.append(("distillation off", Run(f"{MAIN}-no-distill", MAIN, distill_weight=0.0, seeds=first)))
    else:
        w = args.ablation_distill_weight
        extras.append((f"distillation on (weight {w:g})", Run(f"{MAIN}-distill", MAIN, distill_weight=w, seeds=first)))
    if run_precision(args) == "bf16":
        extras.append(("fp32 instead of bf16", Run(f"{MAIN}-fp32", MAIN, precision="fp32", seeds=first)))
    return extras


def runs_for(methods: list[str], ablation: bool, args: argparse.Namespace | None = None
             ) -> tuple[list[Run], dict[str, tuple[str, str]]]:
    """Every prune run to do (methods first, then the ablation steps no method already covers)
    and, per ablation step, the label and phase of the run that holds it."""
    seeds = tuple(args.seeds) if args is not None else (0,)
    seeded = {MAIN, *(args.seeded_methods if args is not None else [])}
    runs = [Run(m, m, seeds=seeds if m in seeded else seeds[:1]) for m in methods]
    steps: dict[str, tuple[str, str]] = {}
    recovering = bool(args is not None and recover_targets(args))
    headline = "recovered" if recovering else "round"
    if ablation:
        by_setting = {r.resolved(): r.label for r in runs}
        for name, allocator, criterion in ABLATION:
            run = Run(f"{allocator}-{criterion}" if allocator else MAIN, MAIN, allocator, criterion, seeds=seeds[:1])
            if run.resolved() not in by_setting:
                runs.append(run)
                by_setting[run.resolved()] = run.label
            steps[name] = (by_setting[run.resolved()], headline)
        if args is not None:
            if recovering:
                steps["recovery off (after the rounds)"] = (MAIN, "round")
            for name, run in ablation_extras(args):
                runs.append(run)
                steps[name] = (run.label, headline)
    return runs, steps


def common_args(args: argparse.Namespace) -> list[str]:
    out = ["--size", str(args.size), "--batch-size", str(args.batch_size), "--device", args.device]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.limit:
        out += ["--limit", str(args.limit)]
    return out


def run_dir(work: Path, label: str, seed: int) -> Path:
    return work / label / f"s{seed}"


def recovery_dir(folder: Path, target: float, args: argparse.Namespace) -> Path:
    """Where a run's point at ``target`` is recovered (the recovery's settings in the name)."""
    return folder.parent / f"{folder.name}-recover-{target:g}-e{args.recover_epochs}-lr{args.recover_lr:g}"


def prune_command(run: Run, checkpoint: Path, out: Path, args: argparse.Namespace, seed: int,
                  target: float | None = None) -> list[str]:
    """``python -m core prune``'s arguments: the whole run (``target`` None: to the last target,
    no recovery) or its recovery at ``target`` (resumed on a truncated copy)."""
    targets = sorted(args.targets)
    last = targets[-1] if target is None else target
    precision = run.precision or getattr(args, "precision", "auto")
    distill = run.distill_weight if run.distill_weight is not None else getattr(args, "distill_weight", 0.0)
    command = ["prune", "--checkpoint", str(checkpoint), "--method", run.method, "--target-macs", str(last),
               "--no-tolerance-stop", "--step", str(args.step),
               "--finetune-epochs", str(args.finetune_epochs), "--lr", str(args.finetune_lr),
               "--max-rounds", str(args.max_rounds),
               "--scoring-steps", str(args.scoring_steps), "--seed", str(seed), "--out", str(out),
               "--precision", precision, "--distill-weight", f"{distill:g}",
               "--distill-temperature", f"{getattr(args, 'distill_temperature', DEFAULT_DISTILL_TEMPERATURE):g}",
               *common_args(args)]
    if run.allocator:
        command += ["--allocator", run.allocator]
    if run.criterion:
        command += ["--criterion", run.criterion]
    milestones = [t for t in targets if t < last - 1e-9]
    if milestones:
        command += ["--milestones", *map(str, milestones)]
    if args.round_to > 1:
        command += ["--round-to", str(args.round_to)]
    if target is not None:
        command += ["--recover-epochs", str(args.recover_epochs), "--recover-lr", f"{args.recover_lr:g}"]
    return command


def _state(out: Path) -> dict | None:
    path = out / "rounds.json"
    return json.loads(path.read_text()) if path.is_file() else None


def prune(run: Run, checkpoint: Path, out: Path, args: argparse.Namespace,
          log: Path | None = None, seed: int = 0) -> tuple[dict | None, str]:
    """One prune run through every target (resumed when interrupted before); its rounds.json
    (partial with --report-only) and its command."""
    command = prune_command(run, checkpoint, out, args, seed)
    state = _state(out)
    if not (state and "result" in state) and not args.report_only:
        print(f"  {run.label} seed {seed}: python -m core {shlex.join(command)}", flush=True)
        run_core(command, log)  # resumes after the last finished round when interrupted before
        state = _state(out)
    return state, "python -m core " + shlex.join(command)


def recover(run: Run, checkpoint: Path, folder: Path, target: float, args: argparse.Namespace,
            log: Path | None = None, seed: int = 0) -> tuple[dict | None, str | None]:
    """The recovered point of a finished run at ``target``: the run's folder copied up to the
    target's first round and resumed with the recovery phase (cached: a finished copy is
    read back). Its rounds.json and command; (None, None) when the run never reached it."""
    state = _state(folder)
    hit = first_round(state, target) if state else None
    if hit is None:
        return None, None
    out = recovery_dir(folder, target, args)
    command = prune_command(run, checkpoint, out, args, seed, target)
    saved = _state(out)
    if saved and not copy_matches(folder, out, hit[0]["round"]):
        saved = None  # copied from an earlier version of the run: made again (without --report-only)
    if not (saved and "result" in saved and saved.get("recovery")) and not args.report_only and "result" in state:
        truncated_copy(folder, out, hit[0]["round"])
        print(f"  {run.label} seed {seed} at {target:g}: python -m core {shlex.join(command)}", flush=True)
        run_core(command, log)  # the target is reached: the loop goes straight to the recovery
        saved = _state(out)
    return saved, "python -m core " + shlex.join(command) + "   # on a copy of the rounds up to the target"


def first_round(state: dict, target: float) -> tuple[dict, float] | None:
    """The first round of a run that reaches ``target`` and the run's wall time up to its end."""
    wall = 0.0
    for r in state["rounds"]:
        wall += r["wall_s"]
        if r["macs_reduction"] >= target - 1e-3:
            return r, wall
    return None


def planned_rounds(targets: list[float], step: float) -> int:
    """Rounds a run takes through every target (the loop's schedule: a step of the remaining
    MACs, stopping at each milestone): what the control fine-tunes for."""
    left, rounds = 1.0, 0
    for target in sorted(targets):
        while 1.0 - left < target - 1e-3:
            left = max(left * (1.0 - step), 1.0 - target)
            rounds += 1
    return rounds


# ------------------------------------------------------------------ measuring
def measure_cache(checkpoint: str | Path, args: argparse.Namespace) -> Path:
    """Where a checkpoint's measurement is cached: under ``--work``/measured for what the
    benchmark made (a prune run's folder holds the loop's files alone, which it checks before
    resuming), beside the checkpoint for the baselines."""
    path, work = Path(checkpoint).resolve(), Path(args.work).resolve()
    if work in path.parents:
        return work / "measured" / f"{path.relative_to(work)}.json"
    return Path(f"{checkpoint}.bench.json")


def measure(checkpoint: str | Path, test_ds, args: argparse.Namespace, metrics: dict | None = None,
            latency: bool = True) -> dict:
    """Test accuracy, size and (``latency``) batch-1 latency of one checkpoint, cached beside
    it. ``metrics``: its test metrics as the loop already measured them on the same split."""
    from core.models.checkpoint import load_checkpoint
    from core.profile import checkpoint_size_bytes, export_onnx, measure_latency, measure_onnx_latency
    from core.train import evaluate

    cache = measure_cache(checkpoint, args)
    if cache.is_file():
        point = json.loads(cache.read_text())
        if not latency or "latency_ort_ms" in point:
            return point
    else:
        point = {}
    if _PLANNED is not None:  # `run_measurements` finding what to measure on Ray: noted, measured there
        _PLANNED.append((checkpoint, metrics, latency))
        return {"defect_miou": 0.0, "per_class_iou": {"background": 0.0}, "size_bytes": 0,
                "latency_torch_ms": 0.0, "latency_ort_ms": 0.0, **point}
    loaded = None
    if "defect_miou" not in point:
        if metrics is None:
            loaded = load_checkpoint(checkpoint)
            metrics = evaluate(loaded.model.eval(), test_ds, batch_size=args.batch_size,
                               class_names=loaded.spec.classes, per_image=False).metrics.to_dict()
        point.update({"defect_miou": metrics["defect_miou"], "per_class_iou": metrics["per_class_iou"],
                      "size_bytes": checkpoint_size_bytes(checkpoint)})
    if latency:
        loaded = loaded or load_checkpoint(checkpoint)
        model, spec = loaded.model.eval(), loaded.spec
        size, channels = tuple(spec.input_size), spec.in_channels
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(model, Path(tmp) / "model.onnx", size, channels)
            point["latency_ort_ms"] = measure_onnx_latency(onnx_path, size, channels, runs=args.latency_runs,
                                                           threads=1).median_ms
        point["latency_torch_ms"] = measure_latency(model, size, channels, runs=args.latency_runs, threads=1).median_ms
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(point, indent=2))
    return point


def fine_tune_copy(checkpoint: str | Path, epochs: int, out: Path, args: argparse.Namespace,
                   splits: dict | None = None, recovery: bool = False) -> tuple[Path | None, float]:
    """A copy of ``checkpoint`` fine-tuned for ``epochs`` more epochs (cached in ``out``): the
    controls. ``recovery``: with the loop's recovery schedule (warm-up + cosine, ``--recover-lr``,
    its seed offset) instead of a round's fine-tune. The splits are built from the checkpoint
    when not given. (None, 0) with --report-only when not cached."""
    from core.models.checkpoint import load_checkpoint, save_checkpoint
    from core.train import TrainConfig, fine_tune

    seed = args.seeds[0]
    lr = args.recover_lr if recovery else args.finetune_lr
    precision = getattr(args, "precision", "auto")
    wanted = {"epochs": epochs, "lr": lr, "recovery": recovery, "precision": precision, "seed": seed}
    done = out / "fine_tune.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        # runs cached before the recovery, precision and seed were recorded were round controls at seed 0, auto
        old = {"recovery": False, "precision": "auto", "seed": 0, "lr": lr}
        if all(saved.get(k, old.get(k)) == v for k, v in wanted.items()):
            return out / "checkpoint", saved["wall_s"]
    if args.report_only:
        return None, 0.0
    start = time.perf_counter()
    splits = splits or datasets_for(checkpoint, args)
    loaded = load_checkpoint(checkpoint)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, patience=None, seed=seed,
                         num_threads=args.threads, device=args.device, precision=precision)
    if recovery:  # as the loop's _recover sets it
        config.seed, config.schedule, config.warmup_fraction = seed + 999_999, "cosine", RECOVER_WARMUP
    print(f"  {out.relative_to(args.work)}: fine-tuning {checkpoint} for {epochs} epoch(s)"
          f"{' (the recovery schedule)' if recovery else ''}", flush=True)
    result = fine_tune(loaded.model, splits["train"], splits["val"], config, class_names=loaded.spec.classes,
                       progress=lambda _: STOPPING.is_set())
    if result.stopped_by_user:
        raise KeyboardInterrupt("the fine-tune was stopped with the benchmark")
    save_checkpoint(out / "checkpoint", loaded.model, loaded.spec, loaded.history)
    wall = time.perf_counter() - start
    done.write_text(json.dumps({**wanted, "wall_s": wall, "result_precision": result.precision}))
    return out / "checkpoint", wall


def datasets_for(checkpoint: Path, args: argparse.Namespace):
    from core.services.datasets import index_for_checkpoint
    from core.data.dataset import SegmentationDataset
    from core.models.checkpoint import read_spec

    spec = read_spec(checkpoint)
    index, _ = index_for_checkpoint(checkpoint, spec, None, None, None, None)
    size = tuple(spec.input_size)
    return {split: SegmentationDataset(index, split, size, spec.in_channels, augment=split == "train",
                                       seed=args.seeds[0], limit=args.limit, normalisation=spec.normalisation)
            for split in ("train", "val", "test")}


@dataclass
class Setting:
    """One dataset x size x architecture: its baseline and the prune runs on it."""
    fmt: str
    root: Path
    arch: str
    methods: list[str]
    ablation: bool
    size: int | None = None  # None: the dataset's --size

    def run_args(self, args: argparse.Namespace) -> argparse.Namespace:
        """``args`` with this setting's input size (an int, as every command takes it)."""
        return argparse.Namespace(**{**vars(args), "size": self.size or size_for(self.fmt, args)})

    def tag(self, args: argparse.Namespace) -> str:
        """The cache folder of the setting's runs: every benchmark setting that changes them."""
        size = self.size or size_for(self.fmt, args)
        precision = run_precision(args)
        distill = getattr(args, "distill_weight", 0.0)
        temperature = getattr(args, "distill_temperature", DEFAULT_DISTILL_TEMPERATURE)
        return (f"{self.fmt}-{self.arch}-{args.encoder}-{size}" + (f"-r{args.round_to}" if args.round_to > 1 else "")
                + (f"-lr{args.finetune_lr:g}" if args.finetune_lr != DEFAULT_FINETUNE_LR else "")
                + (f"-{precision}" if precision != "fp32" else "")
                + (f"-d{distill:g}" if distill > 0 else "")
                + (f"-T{temperature:g}" if distill > 0 and temperature != DEFAULT_DISTILL_TEMPERATURE else ""))

    def baseline_args(self, args: argparse.Namespace) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), "arch": self.arch, "workers": 0, "lr": 1e-3,
                                     "size": self.size or size_for(self.fmt, args),
                                     "seed": getattr(args, "baseline_seed", 0), "limit": args.baseline_limit,
                                     "precision": getattr(args, "precision", "fp32"),
                                     "schedule": getattr(args, "schedule", "cosine")})


def train_all(settings: list[Setting], args: argparse.Namespace, runner: "ThreadJobs | RayJobs | None" = None) -> None:
    """Train every baseline, prune run, recovery and control that is not cached yet, `--jobs`
    at a time (or as Ray tasks, ``runner`` a `RayJobs`).

    Longest first: baselines by epochs, then per setting the controls and the runs as soon as
    its baseline is there, and a run's recoveries as soon as the run ends. With more than one
    job, each command's progress goes to a log file beside its output and a bar counts finished
    jobs. A failed job stops the benchmark once the running ones end (their work stays cached,
    so a rerun continues). On Ray a job whose output exists is not submitted: it counts as
    finished at once."""
    from tqdm.auto import tqdm

    runner = runner or ThreadJobs(args.jobs)

    def log(setting: Setting, name: str) -> Path | None:
        return args.work / setting.tag(args) / f"{name}.log" if args.jobs > 1 or runner.remote else None

    recovering = recover_targets(args)

    def count(setting: Setting) -> int:
        runs = runs_for(setting.methods, setting.ablation, args)[0]
        seeds = sum(len(run.seeds) for run in runs)
        return 1 + (2 if recovering else 1) + seeds * (1 + len(recovering))

    STOPPING.clear()
    checkpoints: dict[str, Path] = {}  # setting tag -> its baseline checkpoint
    jobs: dict = {}  # handle -> (setting, job name, kind: baseline, control, run or recovery, extra)
    cached: list = []  # ((setting, name, kind, extra), result) of the jobs whose output was there (Ray)
    total = sum(count(s) for s in settings)
    with tqdm(total=total, desc="training jobs", unit="job") as bar:
        def submit(setting: Setting, name: str, kind: str, extra, fn, *fn_args, **fn_kwargs) -> None:
            meta = (setting, name, kind, extra)
            done = runner.finished(kind, fn, fn_args, fn_kwargs)
            if done is not None:
                cached.append((meta, done[0]))
            else:
                jobs[runner.submit(fn, *fn_args, name=f"{setting.tag(args)}/{name}", **fn_kwargs)] = meta

        def finished(meta: tuple, result) -> None:
            setting, name, kind, extra = meta
            bar.update()
            work, sargs = args.work / setting.tag(args), setting.run_args(args)
            if kind == "baseline":
                checkpoint = result[0]
                checkpoints[setting.tag(args)] = checkpoint
                epochs = planned_rounds(args.targets, args.step) * args.finetune_epochs
                submit(setting, "none", "control", None, fine_tune_copy, checkpoint, epochs, work / "none", sargs)
                for run in runs_for(setting.methods, setting.ablation, args)[0]:
                    for seed in run.seeds:
                        submit(setting, f"{run.label}-s{seed}", "run", (run, seed), prune, run, checkpoint,
                               run_dir(work, run.label, seed), sargs, log(setting, f"{run.label}-s{seed}"),
                               seed=seed)
            elif kind == "control" and recovering:
                submit(setting, "none-recovered", "control-recovered", None, fine_tune_copy,
                       result[0], args.recover_epochs, work / "none" / "recovered", sargs,
                       recovery=True)
            elif kind == "run" and recovering:
                run, seed = extra
                checkpoint = checkpoints[setting.tag(args)]
                for target in recovering:
                    submit(setting, f"{name}@{target:g}", "recovery", None, recover, run, checkpoint,
                           run_dir(work, run.label, seed), target, sargs,
                           log(setting, f"{run.label}-s{seed}-recover-{target:g}"), seed=seed)

        try:
            for setting in sorted(settings, key=lambda s: -epochs_for(s.fmt, s.baseline_args(args))):
                submit(setting, "baseline", "baseline", None, train_baseline, setting.fmt, setting.root,
                       setting.baseline_args(args), args.baseline_cache, log(setting, "baseline"))
            while jobs or cached:
                while cached:
                    finished(*cached.pop(0))
                if not jobs:
                    break
                for handle in runner.wait(jobs):
                    meta = jobs.pop(handle)
                    try:
                        result = runner.result(handle)
                    except BaseException:
                        bar.write(f"[{meta[0].tag(args)}] {meta[1]} failed; waiting for the running jobs to end")
                        raise
                    finished(meta, result)
        except BaseException:
            runner.stop(list(jobs))
            STOPPING.set()  # Ctrl-C reaches the commands too; the in-process control needs telling
            raise
        finally:
            runner.close()


# ------------------------------------------------------------------ where the jobs run
class ThreadJobs:
    """The local thread pool: ``--jobs`` at a time, each job a ``python -m core`` process (or
    an in-process control) that finds its own cached output."""

    remote = False

    def __init__(self, jobs: int):
        self.pool = ThreadPoolExecutor(jobs)

    def finished(self, kind: str, fn, fn_args: tuple, fn_kwargs: dict) -> tuple | None:
        return None  # every job is run: one whose output exists returns at once

    def submit(self, fn, *fn_args, name: str = "", **fn_kwargs):
        return self.pool.submit(fn, *fn_args, **fn_kwargs)

    def wait(self, handles) -> list:
        return list(wait(handles, return_when=FIRST_COMPLETED)[0])

    def result(self, handle):
        return handle.result()

    def stop(self, handles: list) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True)  # the jobs already running end (their work stays cached)


def _call(module: str, name: str, *fn_args, **fn_kwargs):
    """A Ray task: one of the benchmark's jobs, run in a Ray worker process. The function goes
    by name (this file runs as ``__main__``, whose functions Ray would copy with their globals)."""
    import importlib

    return getattr(importlib.import_module(module), name)(*fn_args, **fn_kwargs)


def _report_only(values: tuple | dict):
    """``values`` with every benchmark Namespace among them set to run nothing."""
    swap = lambda v: argparse.Namespace(**{**vars(v), "report_only": True}) if isinstance(v, argparse.Namespace) else v
    return {k: swap(v) for k, v in values.items()} if isinstance(values, dict) else tuple(swap(v) for v in values)


class RayJobs:
    """Each job a Ray task with the resources it needs: ``--threads`` CPUs and, where it trains
    on CUDA, one GPU (Ray hands the task its own CUDA_VISIBLE_DEVICES, which the job's
    ``python -m core`` process inherits). A measurement takes one CPU. A job whose output
    exists is run here instead (it only reads its cache) and never submitted; ``submitted``
    lists the tasks that were."""

    remote = True

    def __init__(self, ray, args: argparse.Namespace):
        self.ray, self.args = ray, args
        self.task = ray.remote(_call)
        self.gpus = ray_gpus(ray, args)
        self.submitted: list[str] = []

    def finished(self, kind: str, fn, fn_args: tuple, fn_kwargs: dict) -> tuple | None:
        """(result,) when the job's output is there already, else None."""
        if kind == "baseline":
            fmt, _, base_args, cache = fn_args[:4]
            if not (cache / baseline_tag(fmt, base_args) / "training_history.json").is_file():
                return None
            return (fn(*fn_args, **fn_kwargs),)  # reads the cached checkpoint
        result = fn(*_report_only(fn_args), **_report_only(fn_kwargs))  # runs nothing: reads what is there
        state = result[0]
        if kind in ("control", "control-recovered"):
            done = state is not None
        elif kind == "run":
            done = bool(state and "result" in state)
        elif kind == "recovery":  # (None, None): the run never reached the target, nothing to do
            done = result == (None, None) or bool(state and "result" in state and state.get("recovery"))
        else:
            done = False
        return (result,) if done else None

    def submit(self, fn, *fn_args, name: str = "", cpus: int | None = None, gpus: float | None = None, **fn_kwargs):
        self.submitted.append(name)
        options = {"num_cpus": self.args.threads if cpus is None else cpus,
                   "num_gpus": self.gpus if gpus is None else gpus, "name": name}
        module = "bench.compression" if fn.__module__ == "__main__" else fn.__module__
        return self.task.options(**options).remote(module, fn.__name__, *fn_args, **fn_kwargs)

    def wait(self, handles) -> list:
        return self.ray.wait(list(handles), num_returns=1)[0]

    def result(self, handle):
        return self.ray.get(handle)

    def stop(self, handles: list) -> None:
        for handle in handles:  # a running task gets KeyboardInterrupt: its command is killed, rounds kept
            try:
                self.ray.cancel(handle)
            except Exception:
                pass

    def close(self) -> None:
        pass


RAY_LOCAL, RAY_AUTO = "local", "auto"


def ray_gpus(ray, args: argparse.Namespace) -> int:
    """GPUs a training task asks for: one where it trains on CUDA (``--device cuda``, or
    ``auto`` on a cluster that has GPUs), else none."""
    if args.device == "cpu":
        return 0
    if args.device == "cuda":
        return 1
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def connect_ray(address: str, cpus: int | None = None):
    """Ray, connected to the cluster at ``address`` (``auto``: the one `ray start` runs on this
    machine; ``local``: a new one-machine cluster of ``cpus`` CPUs, ended with the benchmark),
    or to the one this process already started. Returns (ray, whether it was started here)."""
    try:
        import ray
    except ImportError:
        raise BenchmarkError("--ray needs Ray: .venv/bin/pip install -r requirements.txt") from None
    if ray.is_initialized():
        return ray, False
    if address not in (RAY_LOCAL, RAY_AUTO):
        _check_reachable(address)  # Ray itself retries an address where nothing answers for minutes
    import logging

    path = os.environ.get("PYTHONPATH", "")
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}}
    try:
        if address == RAY_LOCAL:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env=runtime_env)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchmarkError(f"--ray {address}: cannot reach a Ray cluster ({first}); start one with "
                             "`ray start --head`, or use --ray local") from None
    return ray, True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster address (``HOST:PORT`` or ``ray://HOST:PORT``) that answers a TCP connection."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise BenchmarkError(f"--ray takes auto, local or a cluster's HOST:PORT, not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BenchmarkError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); start the cluster "
                             "with `ray start --head`, or use --ray local") from None


class BenchmarkError(Exception):
    """A setting the benchmark cannot run with (said as one usage error)."""


def run_measurements(settings: list[Setting], args: argparse.Namespace, runner: RayJobs) -> dict[str, dict]:
    """On Ray: every setting's baseline summary and every measurement not cached yet, as Ray
    tasks (one CPU each); returns the baseline summaries by setting tag. Which points a setting
    measures is found by running `benchmark_setting` once with `measure` only noting what it
    would measure; the report is then built from the caches the tasks wrote."""
    import contextlib
    import io

    from tqdm.auto import tqdm

    global _PLANNED
    baselines, pending = {}, {}
    for setting in settings:
        base_args = setting.baseline_args(args)
        checkpoint = args.baseline_cache / baseline_tag(setting.fmt, base_args)
        if not (checkpoint / "training_history.json").is_file():
            continue
        if (args.baseline_cache / f"{baseline_tag(setting.fmt, base_args)}.test.json").is_file():
            baselines[setting.tag(args)] = benchmark_dataset(setting.fmt, setting.root, base_args, args.baseline_cache)
        else:
            pending[runner.submit(benchmark_dataset, setting.fmt, setting.root, base_args, args.baseline_cache,
                                  name=f"{setting.tag(args)}/baseline-evaluation", cpus=args.threads,
                                  gpus=0)] = setting.tag(args)
    try:
        for handle in list(pending):
            baselines[pending.pop(handle)] = runner.result(handle)
    except BaseException:
        runner.stop(list(pending))
        raise
    wanted: dict[Path, dict] = {}  # measure cache -> what to measure
    for setting in settings:
        baseline = baselines.get(setting.tag(args))
        if baseline is None:
            continue
        _PLANNED = []
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                benchmark_setting(setting, args, baseline)
            planned = _PLANNED
        finally:
            _PLANNED = None
        for checkpoint, metrics, latency in planned:
            key = measure_cache(checkpoint, args)
            entry = wanted.setdefault(key, {"checkpoint": checkpoint, "base": Path(baseline["checkpoint"]),
                                            "args": setting.run_args(args), "metrics": None, "latency": False})
            entry["metrics"] = entry["metrics"] or metrics
            entry["latency"] = entry["latency"] or latency
    tasks = {runner.submit(measure_task, e["checkpoint"], e["base"], e["args"], e["metrics"], e["latency"],
                           name=f"measure {e['checkpoint']}", cpus=1, gpus=0): e for e in wanted.values()}
    with tqdm(total=len(tasks), desc="measurements", unit="point") as bar:
        try:
            while tasks:
                for handle in runner.wait(tasks):
                    entry = tasks.pop(handle)
                    try:
                        runner.result(handle)
                    except BaseException:
                        bar.write(f"measuring {entry['checkpoint']} failed")
                        raise
                    bar.update()
        except BaseException:
            runner.stop(list(tasks))
            raise
    return baselines


def measure_task(checkpoint: str | Path, base: Path, args: argparse.Namespace, metrics: dict | None,
                 latency: bool) -> None:
    """A Ray task: `measure` one checkpoint on its setting's test split (built here, from the
    baseline's checkpoint, when the accuracy is not known already), writing its cache."""
    test_ds = datasets_for(base, args)["test"] if metrics is None else None
    measure(checkpoint, test_ds, args, metrics=metrics, latency=latency)


def benchmark_setting(setting: Setting, args: argparse.Namespace, baseline: dict | None = None) -> dict | None:
    """Measure and tabulate one setting (what `train_all` left cached; with --report-only, what
    is finished so far). ``baseline``: its baseline's summary when already made (on Ray)."""
    fmt, arch = setting.fmt, setting.arch
    tag, sargs = setting.tag(args), setting.run_args(args)
    work = args.work / tag
    print(f"[{tag}] baseline", flush=True)
    base_args = setting.baseline_args(args)
    if args.report_only and not (args.baseline_cache / baseline_tag(fmt, base_args) / "training_history.json").is_file():
        print(f"[{tag}] no trained baseline yet: left out of the report", flush=True)
        return None
    baseline = baseline or benchmark_dataset(fmt, setting.root, base_args, args.baseline_cache)
    checkpoint = Path(baseline["checkpoint"])
    splits = datasets_for(checkpoint, sargs)
    base = measure(checkpoint, splits["test"], sargs)
    runs, ablation_steps = runs_for(setting.methods, setting.ablation, args)
    recovering = recover_targets(args)
    common = {"dataset": fmt, "arch": arch, "size": sargs.size}

    # the controls: as long as a run's rounds fine-tune, then as long as its recovery
    rounds = planned_rounds(args.targets, args.step)
    controls = []
    ctrl_ckpt, ctrl_wall = fine_tune_copy(checkpoint, rounds * args.finetune_epochs, work / "none", sargs, splits)
    if ctrl_ckpt is not None:
        ctrl = measure(ctrl_ckpt, splits["test"], sargs)
        controls.append(("round", ctrl, ctrl_wall))
        if recovering:
            rec_ckpt, rec_wall = fine_tune_copy(ctrl_ckpt, args.recover_epochs, work / "none" / "recovered", sargs,
                                                splits, recovery=True)
            if rec_ckpt is not None:
                rec = measure(rec_ckpt, splits["test"], sargs, latency=False)
                controls.append(("recovered", {**rec, "latency_torch_ms": ctrl["latency_torch_ms"],
                                               "latency_ort_ms": ctrl["latency_ort_ms"]}, ctrl_wall + rec_wall))

    points, commands, finished = [], {}, {}
    for run in runs:
        for seed in run.seeds:
            folder = run_dir(work, run.label, seed)
            state, commands[(run.label, seed)] = prune(run, checkpoint, folder, sargs, seed=seed)
            if state is None:
                continue
            finished[(run.label, seed)] = "result" in state
            for target in sorted(args.targets):
                hit = first_round(state, target)
                if hit is None:
                    continue
                r, wall = hit
                copy_state = None
                if target in recovering:
                    copy_state, command = recover(run, checkpoint, folder, target, sargs, seed=seed)
                    if command:
                        commands[(run.label, seed, target)] = command
                done = copy_state is not None and "result" in copy_state and copy_state.get("recovery")
                known = (copy_state["result"].get("pre_recovery") or {}).get("test") if done else None
                point = measure(r["checkpoint"], splits["test"], sargs, metrics=known)
                row = {**common, "method": run.label, "target": target, "seed": seed, "phase": "round",
                       "macs_reduction": r["macs_reduction"], "params_reduction": r["params_reduction"],
                       "wall_s": wall, **_point(point)}
                points.append(row)
                if done:
                    rec = copy_state["recovery"]
                    rpoint = measure(rec["checkpoint"], splits["test"], sargs, metrics=copy_state["result"].get("test"),
                                     latency=False)
                    points.append({**row, "phase": "recovered", "macs_reduction": rec["macs_reduction"],
                                   "params_reduction": rec["params_reduction"], "wall_s": wall + rec["wall_s"],
                                   **_point({**rpoint, "latency_torch_ms": point["latency_torch_ms"],
                                             "latency_ort_ms": point["latency_ort_ms"]}),
                                   "recovery": rec})
    reference = max([base["defect_miou"], *(c["defect_miou"] for _, c, _ in controls)])
    rows = [{**common, "method": "none", "target": 0.0, "seed": args.seeds[0], "phase": phase,
             "macs_reduction": 0.0, "params_reduction": 0.0, "wall_s": wall, **_point(c)}
            for phase, c, wall in controls] + points
    for row in rows:
        row["drop"] = reference - row["defect_miou"]
    history = baseline["history"]
    return {"tag": tag, "fmt": fmt, "arch": arch, "encoder": args.encoder, "size": sargs.size, "baseline": baseline,
            "base": {**base, "miou_all": miou_all(base)}, "controls": {phase: c for phase, c, _ in controls},
            "reference": reference, "rows": rows, "commands": commands, "ablation": ablation_steps,
            "rounds": rounds, "finished": finished, "methods": list(setting.methods),
            "seeds": {run.label: list(run.seeds) for run in runs}, "training": history}


def _point(point: dict) -> dict:
    return {"defect_miou": point["defect_miou"], "miou_all": miou_all(point), "size_bytes": point["size_bytes"],
            "latency_torch_ms": point["latency_torch_ms"], "latency_ort_ms": point["latency_ort_ms"]}


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per method x target x phase: mean and standard deviation over the seeds of the
    accuracies and the drop, means of the rest, in the rows' order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["target"], row["phase"]), []).append(row)
    out = []
    for (method, target, phase), group in groups.items():
        entry = {"method": method, "target": target, "phase": phase, "n": len(group),
                 "seeds": [r["seed"] for r in group], "by_seed": {r["seed"]: r["defect_miou"] for r in group}}
        for key in ("defect_miou", "miou_all", "drop"):
            entry[key], entry[f"{key}_sd"] = mean_sd([r[key] for r in group])
        for key in ("macs_reduction", "params_reduction", "size_bytes", "latency_torch_ms", "latency_ort_ms", "wall_s"):
            entry[key] = mean_sd([r[key] for r in group])[0]
        out.append(entry)
    return out


def comparisons(setting: dict, args: argparse.Namespace) -> list[dict]:
    """Per target and phase, the paired per-seed difference of the method minus each seeded
    baseline (test defect mIoU points)."""
    at = {(a["method"], a["target"], a["phase"]): a for a in aggregate(setting["rows"])}
    out = []
    for target in sorted(args.targets):
        for phase in PHASES:
            main = at.get((MAIN, target, phase))
            if main is None:
                continue
            for other in args.seeded_methods:
                if other == MAIN or (other, target, phase) not in at:
                    continue
                diff = paired_difference(main["by_seed"], at[(other, target, phase)]["by_seed"])
                if diff is not None:
                    out.append({"target": target, "phase": phase, "baseline": other, **diff})
    return out


# ------------------------------------------------------------------ report
def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_sd(mean: float | None, sd: float | None, signed: bool = False) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {sd:.2f}" if sd is not None else "")


def fmt_interval(diff: dict) -> str:
    if diff["low"] is None:
        return f"{diff['mean']:+.2f} (n={diff['n']}, no interval)"
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}] (n={diff['n']})"


def method_name(label: str, setting: dict) -> str:
    """A run's label, marked when it ran with one seed where the method has several."""
    seeds = setting["seeds"].get(label)
    return f"{label} (1 seed)" if seeds is not None and len(seeds) < max(map(len, setting["seeds"].values())) else label


def training_line(setting: dict) -> str:
    h = setting["training"]
    stop = "stopped early" if h.get("stopped_early") else "ran every epoch"
    return (f"Baseline training: {h['dataset']['train_images']} train / {h['dataset']['val_images']} val images, "
            f"{h['epochs_run']} epoch(s) (best {h['best_epoch']}, {stop}; at most {h['config']['epochs']}, patience "
            f"{h['config']['patience']}), {h.get('precision', 'fp32')}, {h['seconds'] / 60:.1f} min"
            f"{' (cached: not part of this invocation)' if setting['baseline']['reused'] else ''}.")


def table(setting: dict, targets: list[float]) -> list[str]:
    base = setting["base"]
    controls = setting["controls"]
    parts = []
    if "round" in controls:
        parts.append(f"control (`none`, {setting['rounds']} fine-tune epoch(s) without pruning) "
                     f"{controls['round']['defect_miou']:.2f}")
    if "recovered" in controls:
        parts.append(f"then the recovery's schedule {controls['recovered']['defect_miou']:.2f}")
    control = ", ".join(parts) if parts else "control not run yet"
    unfinished = [f"{label} seed {seed}" for (label, seed), done in setting["finished"].items() if not done]
    lines = [f"### {setting['fmt']}, {setting['arch']}-{setting['encoder']}, {setting['size']} px", "",
             f"Baseline test defect mIoU {base['defect_miou']:.2f}, mIoU with background {base['miou_all']:.2f} "
             f"(torch {base['latency_torch_ms']:.1f} ms, ORT {base['latency_ort_ms']:.1f} ms, "
             f"{base['size_bytes'] / 1e6:.1f} MB); {control}; drops against {setting['reference']:.2f}.", "",
             training_line(setting), ""]
    if unfinished:
        lines += [f"**Unfinished runs (their finished rounds are shown): {', '.join(unfinished)}.**", ""]
    lines += ["Mean ± standard deviation over the seeds (n); `round`: after the round's fine-tune, `recovered`: "
              "after the final recovery phase on that round (latency and size are the round's architecture).", "",
              "| method | target | phase | n | defect mIoU | mIoU (bg incl.) | drop | MACs red. | params red. | size MB "
              "| torch ms (gain) | ORT ms (gain) | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in aggregate(setting["rows"]):
        torch_gain = 1 - a["latency_torch_ms"] / base["latency_torch_ms"]
        ort_gain = 1 - a["latency_ort_ms"] / base["latency_ort_ms"]
        lines.append(f"| {method_name(a['method'], setting)} | {fmt_pct(a['target'])} | {a['phase']} | {a['n']} | "
                     f"{fmt_sd(a['defect_miou'], a['defect_miou_sd'])} | {fmt_sd(a['miou_all'], a['miou_all_sd'])} | "
                     f"{fmt_sd(a['drop'], a['drop_sd'], signed=True)} | {fmt_pct(a['macs_reduction'])} | "
                     f"{fmt_pct(a['params_reduction'])} | {a['size_bytes'] / 1e6:.2f} | "
                     f"{a['latency_torch_ms']:.1f} ({fmt_pct(torch_gain)}) | "
                     f"{a['latency_ort_ms']:.1f} ({fmt_pct(ort_gain)}) | {a['wall_s']:.0f} |")
    return lines + [""]


def comparison_table(setting: dict, args: argparse.Namespace) -> list[str]:
    diffs = comparisons(setting, args)
    if not diffs:
        return []
    others = list(dict.fromkeys(d["baseline"] for d in diffs))
    cells = {(d["target"], d["phase"], d["baseline"]): d for d in diffs}
    lines = [f"Paired per-seed difference, {MAIN} minus each seeded baseline (test defect mIoU points; mean "
             "[95% interval, t distribution] over the seeds both ran):", "",
             "| target | phase | " + " | ".join(f"vs {o}" for o in others) + " |",
             "|---|---|" + "---|" * len(others)]
    for target in sorted(args.targets):
        for phase in PHASES:
            row = [fmt_interval(cells[(target, phase, o)]) if (target, phase, o) in cells else "n/a" for o in others]
            if any(c != "n/a" for c in row):
                lines.append(f"| {fmt_pct(target)} | {phase} | " + " | ".join(row) + " |")
    return lines + [""]


def findings(setting: dict, targets: list[float], args: argparse.Namespace | None = None) -> list[str]:
    """The issue's goals, checked and said plainly (reported, never asserted), on the headline
    phase (recovered where it exists, else round), means over the seeds."""
    aggregated = aggregate(setting["rows"])
    at: dict = {}
    for a in aggregated:  # recovered wins over round
        key = (a["method"], a["target"])
        if key not in at or a["phase"] == "recovered":
            at[key] = a
    lines = []
    goal = at.get((MAIN, 0.8))
    if goal:
        ok = goal["params_reduction"] >= 0.9 and goal["drop"] <= 1.0
        lines.append(f"- At 80% fewer MACs, {MAIN} ({goal['phase']}, n={goal['n']}): "
                     f"{fmt_pct(goal['params_reduction'])} fewer parameters, mean drop {goal['drop']:+.2f} points: "
                     f"goal (>= 90%, <= 1.0) {'met' if ok else 'NOT met'}.")
    methods = sorted({a["method"] for a in aggregated} - {"none", MAIN})
    for target in targets:
        if (MAIN, target) not in at:
            continue
        main = at[(MAIN, target)]
        ahead = [m for m in methods if (m, target) in at and at[(m, target)]["defect_miou"] >= main["defect_miou"]]
        lines.append(f"- {fmt_pct(target)} ({main['phase']}): {MAIN} {main['defect_miou']:.2f}; "
                     + ("ahead of every other run (means)." if not ahead else
                        "NOT ahead of " + ", ".join(f"{m} ({at[(m, target)]['defect_miou']:.2f})" for m in ahead) + "."))
    if args is not None:
        for d in comparisons(setting, args):
            if d["low"] is not None and (d["low"] > 0 or d["high"] < 0) and d["phase"] == at[(MAIN, d["target"])]["phase"]:
                lines.append(f"- {fmt_pct(d['target'])} ({d['phase']}): {MAIN} {'above' if d['low'] > 0 else 'below'} "
                             f"{d['baseline']} by {d['mean']:+.2f} points, 95% interval [{d['low']:+.2f}, "
                             f"{d['high']:+.2f}] excluding 0.")
    if setting["ablation"]:
        rows = {(r["method"], r["target"], r["phase"]): r for r in setting["rows"]
                if r["seed"] == min(setting["seeds"].get(r["method"], [r["seed"]]))}
        lines += ["", "Ablation (test defect mIoU per target, one seed each: the first; the criterion and allocation "
                  "steps each against uniform allocation, the others against the method):", "",
                  "| step | run | phase | " + " | ".join(fmt_pct(t) for t in targets) + " |",
                  "|---|---|---|" + "---|" * len(targets)]
        fallback = False
        for step, (label, phase) in setting["ablation"].items():
            cells = []
            for t in targets:
                if (label, t, phase) in rows:
                    cells.append(f"{rows[(label, t, phase)]['defect_miou']:.2f}")
                elif (label, t, "round") in rows:  # a target without recovery: its round point
                    cells.append(f"{rows[(label, t, 'round')]['defect_miou']:.2f}†")
                    fallback = True
                else:
                    cells.append("n/a")
            lines.append(f"| {step} | {label} | {phase} | " + " | ".join(cells) + " |")
        if fallback:
            lines += ["", "† a target not recovered (`--recover-targets`): the point after its round."]
    return lines + [""]


def frontier_png(settings: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.8), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        aggregated = aggregate(setting["rows"])
        headline = "recovered"  # solid; each method's round phase dashed in the same colour
        curves = [(m, phase) for m in setting["methods"] for phase in ("recovered", "round")]
        colours = {}
        for method, phase in curves:
            points = sorted((a["macs_reduction"], a["defect_miou"], a["defect_miou_sd"] or 0.0)
                            for a in aggregated if a["method"] == method and a["phase"] == phase)
            if not points:
                continue
            points = [(0.0, setting["base"]["defect_miou"], 0.0)] + points
            line = ax.errorbar([100 * (1 - x) for x, _, _ in points], [y for _, y, _ in points],
                               yerr=[e for _, _, e in points], marker="o", capsize=3,
                               linestyle="-" if phase == headline else "--", color=colours.get(method),
                               linewidth=2.5 if method == MAIN else 1.2,
                               label=f"{method_name(method, setting)} ({phase})")
            colours.setdefault(method, line[0].get_color())
        ax.axhline(setting["reference"], color="grey", linestyle=":", linewidth=1, label="reference (best unpruned)")
        ax.set_xlabel("MACs left (% of the unpruned model)")
        ax.set_ylabel("test defect mIoU (mean ± sd over seeds)")
        ax.set_title(setting["tag"])
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def job_minutes(settings: list[dict]) -> str:
    """Training job time of what the report shows (one thread each, from the records)."""
    runs = recoveries = controls = baselines = 0.0
    for setting in settings:
        rows = setting["rows"]
        recoveries += sum(r["recovery"]["wall_s"] for r in rows if r["method"] != "none" and r["phase"] == "recovered")
        runs += sum(max((r["wall_s"] for r in rows if r["method"] == label and r["seed"] == seed
                         and r["phase"] == "round"), default=0.0) for label, seed in setting["finished"])
        controls += max((r["wall_s"] for r in rows if r["method"] == "none"), default=0.0)
        baselines += setting["training"]["seconds"]
    return (f"job time (one thread each): prune runs up to their deepest target {runs / 60:.1f} min, recoveries "
            f"{recoveries / 60:.1f} min, controls {controls / 60:.1f} min; the baselines' own training "
            f"{baselines / 60:.1f} min")


def report(settings: list[dict], skipped: list[str], args: argparse.Namespace, argv: list[str], wall: float) -> str:
    targets = sorted(args.targets)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    recovering = recover_targets(args)
    epochs_text = " ".join(f"{k}={v}" if k else str(v) for k, v in args.epochs.items())
    from core.precision import cpu_runs_bf16_fast

    lines = ["# Compression benchmark", "",
             "Command: `" + shlex.join(["python", "bench/compression.py", *argv]) + "`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s) (bf16 dot products: "
             f"{'yes' if cpu_runs_bf16_fast() else 'no'}), torch {torch.__version__}, device {device}"
             f"{' (' + torch.cuda.get_device_name(0) + ')' if device == 'cuda' else ''}, training "
             + (f"jobs and measurements as Ray tasks on `--ray {args.ray}` ({getattr(args, 'ray_cluster', '?')}), "
                if getattr(args, "ray", None) else f"{args.jobs} job(s) at a time, ")
             + f"{args.threads} torch thread(s) each, precision {run_precision(args)} "
             f"(`--precision {args.precision}`); latency at batch 1 on the CPU, 1 thread, median of "
             f"{args.latency_runs}. Wall time of this invocation {wall / 60:.1f} min (cached parts not redone); "
             f"{job_minutes(settings)}. Date {time.strftime('%Y-%m-%d')}.", "",
             f"Settings: step {args.step} of the remaining MACs per round, rounds landing on "
             f"{', '.join(fmt_pct(t) for t in targets)}; {args.finetune_epochs} fine-tune epoch(s) per round "
             f"(learning rate {args.finetune_lr:g}); scoring network {args.scoring_steps} steps; distillation weight "
             f"{args.distill_weight:g} (temperature {args.distill_temperature:g}); "
             + (f"recovery {args.recover_epochs} epoch(s) (learning rate {args.recover_lr:g}, "
                f"{RECOVER_WARMUP:.0%} warm-up, cosine, best validation epoch kept) at "
                f"{', '.join(fmt_pct(t) for t in recovering)}; " if recovering else "no recovery phase; ")
             + f"seeds {', '.join(map(str, args.seeds))} for {MAIN} and "
             f"{', '.join(args.seeded_methods) or 'no baseline'}, the first seed for the others and the ablation, "
             f"baseline seed {args.baseline_seed}; pruning, fine-tuning and test on splits capped at "
             f"{args.limit or 'all'} images, baselines trained on {args.baseline_limit or 'all'} "
             f"(at most `--epochs {epochs_text}`, "
             f"patience {args.patience}, {args.schedule})"
             f"{f'; kept channels rounded to multiples of {args.round_to}' if args.round_to > 1 else ''}. "
             "MACs reduction targets; the point of a target is the first round reaching it.", ""]
    if args.limit:
        lines += [f"**Reduced run: fine-tuning and validation on seeded samples of at most {args.limit} images "
                  "per split, to fit the CPU budget; not the paper's protocol.**", ""]
    lines += [f"- skipped: {s}" for s in skipped] + ([""] if skipped else [])
    for setting in settings:
        lines += table(setting, targets) + comparison_table(setting, args)
        lines += ["Findings:", ""] + findings(setting, targets, args)
        main_runs = [c for k, c in setting["commands"].items() if len(k) == 2]
        recoveries = [c for k, c in setting["commands"].items() if len(k) == 3]
        lines += ["Commands (each run; its recoveries resume a copy of its folder, as the first of them):", "", "```",
                  setting["baseline"]["train_cmd"], *main_runs, *recoveries[:1], "```", ""]
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
    parser.add_argument("--second-arch", default="", help="a second architecture on --second-arch-dataset ('': none)")
    parser.add_argument("--second-arch-dataset", default="neu-seg")
    parser.add_argument("--second-arch-methods", nargs="+", default=["collaborative", "uniform-l1"])
    parser.add_argument("--methods", nargs="+", default=["collaborative", "uniform-l1", "global-l1"], choices=METHODS,
                        help="methods to run (fpgm, bn-scale and random too, one seed each unless seeded)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="pruning and fine-tuning seeds of the method and --seeded-methods (the baseline is shared)")
    parser.add_argument("--seeded-methods", nargs="*", default=["uniform-l1", "global-l1"], choices=METHODS,
                        help="baselines run with every seed (the others and the ablation: the first seed)")
    parser.add_argument("--baseline-seed", type=int, default=0)
    parser.add_argument("--no-ablation", dest="ablation", action="store_false")
    parser.add_argument("--ablation-distill-weight", type=float, default=0.7,
                        help="distillation weight of the ablation's distillation-on run (when --distill-weight is 0)")
    parser.add_argument("--report-only", action="store_true",
                        help="train and prune nothing: report what is finished (e.g. while a run goes on)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--step", type=float, default=0.4)
    parser.add_argument("--max-rounds", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-lr", type=float, default=DEFAULT_FINETUNE_LR,
                        help="learning rate of every round's fine-tune (and of the round control)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="training precision of the baselines, runs and controls (auto: bf16 where fast)")
    parser.add_argument("--distill-weight", type=float, default=0.0,
                        help="distillation from the unpruned model in every fine-tune and recovery (0: off)")
    parser.add_argument("--distill-temperature", type=float, default=DEFAULT_DISTILL_TEMPERATURE)
    parser.add_argument("--recover-epochs", type=int, default=10,
                        help="the loop's final recovery phase at each recovered target (0: off)")
    parser.add_argument("--recover-lr", type=float, default=1e-3)
    parser.add_argument("--recover-targets", nargs="+", default=["0.8", "0.9", "0.95"], metavar="T|all",
                        help="targets whose point is recovered ('all': every target)")
    parser.add_argument("--scoring-steps", type=int, default=100)
    parser.add_argument("--round-to", type=int, default=1,
                        help="kept channel counts as multiples of this (bench/results/latency.md: 16 speeds CPUs up)")
    parser.add_argument("--size", nargs="+", action=FormatValuesAction,
                        default={None: 128, "magnetic-tile": 256}, metavar="N|FORMAT=N",
                        help="input size; FORMAT=N for one dataset (default 128, magnetic-tile=256: its cracks "
                             "are a few pixels wide and vanish at 128)")
    parser.add_argument("--extra-sizes", nargs="*", type=str, default=[], metavar="FORMAT=N",
                        help="more settings of a dataset at another size (e.g. magnetic-tile=128 beside 256)")
    parser.add_argument("--epochs", nargs="+", action=FormatValuesAction, default=epochs_option(["60"]),
                        metavar="N|FORMAT=N",
                        help="most baseline epochs (early stopping on validation); FORMAT=N for one dataset")
    parser.add_argument("--patience", type=int, default=8, help="baseline early stopping")
    parser.add_argument("--schedule", default="plateau", choices=["cosine", "onecycle", "plateau"],
                        help="baseline schedule (plateau: the rate is cut before the early stop)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=500,
                        help="images per split for pruning, fine-tuning, recovery, the controls and the test (0: all)")
    parser.add_argument("--baseline-limit", type=int, default=0, help="images per split for the baselines (0: all)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings and prune runs at once (not with --ray)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="run every job and measurement as a Ray task: 'auto' (the cluster `ray start` runs), "
                             "'local' (start one on this machine), or a cluster address")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="CPUs of the cluster --ray local starts (default: every CPU of the machine)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each job")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--baseline-cache", type=Path, default=CACHE_DEFAULT, help="shared with bench/baseline.py")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "compression")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    args.limit, args.baseline_limit = args.limit or None, args.baseline_limit or None
    start = time.perf_counter()
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads take 1 or more")
    if not 0.0 <= args.distill_weight <= 1.0 or not 0.0 <= args.ablation_distill_weight <= 1.0:
        parser.error("distillation weights are from 0 to 1")
    try:
        extras = extra_sizes(args.extra_sizes)
        if args.recover_epochs:
            for value in args.recover_targets:
                if value != "all" and not any(abs(float(value) - t) < 1e-9 for t in args.targets):
                    parser.error(f"--recover-targets {value} is not one of --targets")
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.ray_cpus is not None and (args.ray != RAY_LOCAL or not 1 <= args.ray_cpus <= 4096):
        parser.error("--ray-cpus takes 1 to 4096, with --ray local")
    args.seeds = list(dict.fromkeys(args.seeds))
    plan = [Setting(fmt, args.data / fmt, args.arch, args.methods, args.ablation) for fmt in args.datasets]
    plan += [Setting(fmt, args.data / fmt, args.arch, args.methods, False, size) for fmt, size in extras
             if fmt in args.datasets and size != size_for(fmt, args)]
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
    if args.ray:
        try:
            ray, started = connect_ray(args.ray, args.ray_cpus)
        except BenchmarkError as exc:
            parser.error(str(exc))
        try:
            runner = RayJobs(ray, args)
            if not args.report_only:
                train_all(runnable, args, runner)
            baselines = run_measurements(runnable, args, runner)
            resources = ray.cluster_resources()
            args.ray_cluster = (f"{int(resources.get('CPU', 0))} CPU(s), {int(resources.get('GPU', 0))} GPU(s), "
                                f"{len([n for n in ray.nodes() if n.get('Alive')])} node(s)")
            settings = [s for s in (benchmark_setting(setting, args, baselines.get(setting.tag(args)))
                                    for setting in runnable) if s is not None]
            print(f"Ray tasks submitted: {len(runner.submitted)}", flush=True)
        finally:
            if started:
                ray.shutdown()
    else:
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
                writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items() if k in COLUMNS})
    if settings:
        frontier_png(settings, args.out_dir / "compression_frontier.png")
    (args.out_dir / "compression.md").write_text(report(settings, skipped, args, argv, time.perf_counter() - start))
    print(f"wrote {args.out_dir / 'compression.md'}", flush=True)
    return 0 if settings else 1


if __name__ == "__main__":
    raise SystemExit(main())
