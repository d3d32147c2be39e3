"""Deployment benchmark (issue 17, ship to the edge): the unpruned and the pruned model (80%
fewer MACs), each as fp32 PyTorch, fp32 ONNX Runtime and static INT8 ONNX Runtime
(`core.quantize.quantize_onnx`: QDQ, per-channel weights, calibrated on seeded training
images), at several input sizes and thread counts: batch-1 CPU latency (median, p10-p90),
file size and test defect mIoU (ONNX files scored with ONNX Runtime, `core.quantize.evaluate_onnx`,
the torch model with `core.train.evaluate`: the same confusion-matrix metric).

    .venv/bin/python bench/deploy.py [--baseline DIR --pruned DIR] [--sizes 128 256] [--threads 1 2]
        [--runs 20] [--warmup 3] [--calibration-images 32] [--epochs 20] [--round-to N] [--work DIR]
        [--quick] [--out bench/results/deploy.md]

Without ``--baseline``/``--pruned`` a small baseline is trained on the default synthetic dataset
(synthetic-steel) and pruned to 80% fewer MACs with the product's own command line
(``python -m core train`` / ``python -m core prune``, the method's defaults at small settings:
few epochs, a short scoring network, one fine-tune epoch per round, every round kept so the
run reaches the target; kept channel counts rounded to the CPU's convolution block, 16 with
AVX-512 and 8 with AVX2, `core.allocation.latency.channel_block`: both engines compute convs in
such blocks, so an unaligned count costs what the next multiple costs or more); the commands
are written into the report. Models and data go to ``--work`` (outside the repository).

Goal (reported, not asserted): the pruned INT8 model at 256 px at least 10x faster than the
unpruned fp32 PyTorch model, within 1 point of the pruned fp32 model's test defect mIoU.

Timing: per (size, threads), PyTorch's two models are timed in turns (run i of each, then run
i + 1, each timed run straight after an untimed one of the same model; `core.profile.latency_in_turns`),
then the four ONNX files in turns (`core.profile.onnx_latency_in_turns`, sessions that do not
spin between runs); each block's 1-minute load average is reported, since
on a shared machine the cores are not all ours. `--quick` is a smoke run (64 px, a 40-image
dataset, few runs) written to the work folder unless `--out` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_WORK = Path.home() / "defectprune-bench" / "deploy"
DEFAULT_OUT = REPO / "bench" / "results" / "deploy.md"
GOAL_SPEEDUP = 10.0
GOAL_POINTS = 1.0
GOAL_SIZE = 256
TARGET_MACS = 0.8
ENGINES = ("torch", "onnxruntime", "onnxruntime_int8")
ENGINE_LABEL = {"torch": "fp32 PyTorch", "onnxruntime": "fp32 ONNX Runtime", "onnxruntime_int8": "INT8 ONNX Runtime"}


@dataclass
class Model:
    label: str  # "unpruned" / "pruned"
    checkpoint: Path
    loaded: Any = None
    macs: dict[int, int] = field(default_factory=dict)
    files: dict[tuple[str, int], Path] = field(default_factory=dict)  # (engine, size) -> ONNX file
    sizes: dict[str, int] = field(default_factory=dict)  # engine -> bytes on disk (largest input size's file)
    miou: dict[tuple[str, int], float | None] = field(default_factory=dict)  # (engine, size)
    latency: dict[tuple[str, int, int], Any] = field(default_factory=dict)  # (engine, size, threads) -> LatencyResult
    load: dict[tuple[str, int, int], float] = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------ models
def run_core(args: list[str], env: dict[str, str], commands: list[str]) -> dict[str, Any]:
    """``python -m core ARGS --json`` in the repository, its JSON; the command is recorded."""
    command = [sys.executable, "-m", "core", *args, "--json"]
    commands.append("python -m core " + " ".join(shlex.quote(a) for a in args))
    log(commands[-1])
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {commands[-1]}")
    return json.loads(done.stdout)


def train_and_prune(args: argparse.Namespace, work: Path) -> tuple[Path, Path, list[str], dict[str, Any]]:
    """The baseline trained and pruned here with the product's command line (reused when the
    work folder already holds them from the same settings)."""
    env = dict(os.environ, DEFECTPRUNE_WORKSPACE=str(work / "workspace"), PYTHONPATH=str(REPO))
    commands: list[str] = []
    baseline, prune_dir = work / "baseline", work / "prune"
    options = ["--option", "num_images=40", "--option", "image_size=64"] if args.quick else []
    train = ["train", "--format", "synthetic-steel", *options, "--size", str(args.train_size), "--epochs",
             str(args.epochs), "--batch-size", "8", "--seed", "0", "--threads", str(max(args.threads)),
             "--out", str(baseline)]
    prune = ["prune", "--checkpoint", str(baseline), *options, "--method", "collaborative", "--target-macs",
             str(TARGET_MACS), "--step", "0.5", "--scoring-steps", str(args.scoring_steps), "--calibration-images",
             "16", "--finetune-epochs", "1", "--recover-epochs", str(args.recover_epochs), "--max-rounds", "4",
             "--round-to", str(args.round_to),
             "--no-tolerance-stop", "--batch-size", "8", "--threads", str(max(args.threads)), "--out", str(prune_dir)]
    # each step is reused when the work folder holds it from the same settings (a run cut short
    # keeps its trained baseline)
    stamps = {"train": work / "train.json", "prune": work / "prune.json"}
    summary: dict[str, Any] = {}

    def cached(step: str, settings: list[str]) -> dict[str, Any] | None:
        if stamps[step].is_file():
            saved = json.loads(stamps[step].read_text())
            if saved.get("settings") == settings:
                commands.append("python -m core " + " ".join(shlex.quote(a) for a in settings))
                log(f"reusing {step} from {stamps[step]}")
                return saved["summary"]
        return None

    work.mkdir(parents=True, exist_ok=True)
    trained = cached("train", train)
    if trained is None:
        start = time.perf_counter()
        result = run_core(train, env, commands)
        trained = {"train_seconds": round(time.perf_counter() - start),
                   "baseline_val_defect_miou": (result.get("val") or {}).get("defect_miou"),
                   "epochs_run": result.get("epochs_run"), "seconds_per_epoch": result.get("seconds_per_epoch")}
        stamps["train"].write_text(json.dumps({"settings": train, "summary": trained}, indent=1))
    summary.update(trained)
    pruned = cached("prune", prune)
    if pruned is None:
        if prune_dir.exists():  # an earlier run's rounds, from other settings or cut short
            import shutil

            shutil.rmtree(prune_dir)
        start = time.perf_counter()
        result = run_core(prune, env, commands)
        if not result["result"].get("checkpoint"):
            raise SystemExit(f"the prune run kept no round ({result['stopped']}); nothing to benchmark")
        pruned = {"prune_seconds": round(time.perf_counter() - start), "pruned": result["result"]["checkpoint"],
                  "macs_reduction": result["result"]["macs_reduction"], "stopped": result["stopped"],
                  "rounds": len(result["rounds"])}
        stamps["prune"].write_text(json.dumps({"settings": prune, "summary": pruned}, indent=1))
    summary.update(pruned)
    return baseline, Path(summary["pruned"]), commands, summary


# ------------------------------------------------------------------ measuring
def measure(args: argparse.Namespace, models: list[Model], work: Path) -> dict[str, Any]:
    import torch

    from core.models.checkpoint import load_checkpoint
    from core.profile import checkpoint_size_bytes, count_macs, export_onnx, latency_in_turns, onnx_latency_in_turns
    from core.quantize import checkpoint_dataset, evaluate_onnx, quantize_onnx
    from core.services.datasets import index_for_checkpoint
    from core.services.export import onnx_metadata_for
    from core.train import TorchThreads, evaluate

    for model in models:
        model.loaded = load_checkpoint(model.checkpoint, device="cpu")
    base = models[0].loaded
    channels = base.spec.in_channels
    options = {"num_images": 40, "image_size": 64} if args.quick and args.baseline is None else {}
    index, _ = index_for_checkpoint(models[0].checkpoint, base.spec, args.format, args.root, None, options)
    info: dict[str, Any] = {"dataset": f"{index.format} at {index.root}", "test_images": len(index.split("test")),
                            "train_size": list(base.spec.input_size), "classes": list(base.spec.classes),
                            "arch": f"{base.spec.arch}-{base.spec.encoder}", "quantise_seconds": {}}
    exports = work / "exports"
    for size in args.sizes:
        shape = (size, size)
        calibration = checkpoint_dataset(index, "train", shape, base.spec)
        test = checkpoint_dataset(index, "test", shape, base.spec, limit=args.limit)
        info["test_images"] = len(test)
        for model in models:
            spec, net = model.loaded.spec, model.loaded.model
            model.macs[size] = count_macs(net, shape, channels)
            stem = exports / f"{model.label}-{size}"
            fp32 = export_onnx(net, f"{stem}.onnx", shape, channels,
                               metadata=onnx_metadata_for(spec, shape, pruned=bool(model.loaded.history)))
            log(f"{model.label} {size} px: quantising on {args.calibration_images} training images")
            quantised = quantize_onnx(fp32, f"{stem}.int8.onnx", calibration, args.calibration_images, seed=0,
                                      dataset_name=index.format)
            info["quantise_seconds"][f"{model.label}-{size}"] = round(quantised.seconds, 1)
            model.files[("onnxruntime", size)], model.files[("onnxruntime_int8", size)] = fp32, quantised.path
            model.sizes = {"torch": checkpoint_size_bytes(model.checkpoint), "onnxruntime": fp32.stat().st_size,
                           "onnxruntime_int8": quantised.path.stat().st_size}
            log(f"{model.label} {size} px: scoring on {len(test)} test images")
            with TorchThreads(max(args.threads)):
                model.miou[("torch", size)] = evaluate(net, test, batch_size=8).metrics.defect_miou
            for engine in ("onnxruntime", "onnxruntime_int8"):
                model.miou[(engine, size)] = evaluate_onnx(model.files[(engine, size)], test, spec.classes,
                                                           threads=max(args.threads), per_image=False).metrics.defect_miou
        for threads in args.threads:
            log(f"{size} px, {threads} thread(s): timing PyTorch (load {load_average():.1f})")
            load = load_average()
            timed = latency_in_turns([m.loaded.model for m in models], shape, channels, runs=args.runs,
                                     warmup=args.warmup, threads=threads, onnx=False)
            for model, result in zip(models, timed):
                model.latency[("torch", size, threads)], model.load[("torch", size, threads)] = result["torch"], load
            log(f"{size} px, {threads} thread(s): timing ONNX Runtime fp32 and INT8 (load {load_average():.1f})")
            load = load_average()
            keys = [(m, engine) for m in models for engine in ("onnxruntime", "onnxruntime_int8")]
            results = onnx_latency_in_turns([m.files[(engine, size)] for m, engine in keys], shape, channels,
                                            runs=args.runs, warmup=args.warmup, threads=threads)
            for (model, engine), result in zip(keys, results):
                model.latency[(engine, size, threads)], model.load[(engine, size, threads)] = result, load
    info["torch_version"] = torch.__version__
    return info


# ------------------------------------------------------------------ report
def mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return ", ".join(found) or "none of avx2/avx512/vnni"


def report(args: argparse.Namespace, models: list[Model], info: dict[str, Any], provenance: list[str],
           summary: dict[str, Any], wall: float, loads: tuple[float, float]) -> str:
    import onnxruntime

    unpruned, pruned = models
    lines = ["# Deployment: pruned and INT8 models on the CPU", ""]
    lines += [f"Command: `{args.command}`", "",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s) shared with other work ({cpu_flags()}), "
              f"torch {info['torch_version']}, onnxruntime {onnxruntime.__version__}. Date {time.strftime('%Y-%m-%d')}. "
              f"Whole run {wall / 60:.1f} min; 1-minute load average {loads[0]:.1f} at the start, {loads[1]:.1f} at "
              "the end (2 cores: above 2, other processes had part of them).", ""]
    lines += ["## Models", ""]
    lines += [f"- {info['arch']}, {len(info['classes'])} classes ({', '.join(info['classes'])}), trained at "
              f"{info['train_size'][0]}x{info['train_size'][1]} px; dataset {info['dataset']}."]
    if provenance:
        lines += ["- Trained and pruned here with the product's command line (small settings: a short "
                  "benchmark, not the method's full budget):", "", "```", *provenance, "```", ""]
        if summary:
            val = summary.get("baseline_val_defect_miou")
            lines += [f"  Training took {summary.get('train_seconds', '?')} s ({summary.get('epochs_run')} epochs, "
                      f"baseline val defect mIoU {points(val)}), pruning {summary.get('prune_seconds', '?')} s "
                      f"({summary.get('rounds')} rounds, stopped: {summary.get('stopped')}); the pruned model is "
                      f"`{summary.get('pruned')}` ({summary.get('macs_reduction', 0):.1%} fewer MACs)."]
    else:
        lines += [f"- Given: unpruned `{unpruned.checkpoint}`, pruned `{pruned.checkpoint}`."]
    for size in args.sizes:
        reduction = 1 - pruned.macs[size] / unpruned.macs[size]
        lines += [f"- {size} px: {unpruned.macs[size] / 1e9:.2f} G MACs unpruned, {pruned.macs[size] / 1e9:.2f} G "
                  f"pruned ({reduction:.1%} fewer)."]
    lines += [f"- INT8: ONNX Runtime `quantize_static`, QDQ, per-channel int8 weights (reduce_range), uint8 "
              f"activations, MinMax calibration on {args.calibration_images} seeded training images at the input "
              "size, after `quant_pre_process`.", ""]
    lines += ["## Results", "",
              f"Batch 1, median (p10-p90) of {args.runs} timed runs after {args.warmup} warm-up runs, in turns "
              "(each timed run straight after an untimed run of the same model: its weights in the caches, as "
              "on a device that runs only it; ONNX Runtime sessions that do not spin between runs). Test defect "
              f"mIoU on {info['test_images']} test images at the input size (ONNX files scored with ONNX Runtime). "
              "Speed-up: against the unpruned fp32 PyTorch model at the same size and threads. Size: the checkpoint "
              "folder (PyTorch) or the ONNX file. Load: the 1-minute load average when the timing block started.", ""]
    lines += ["| model | engine | size | threads | latency ms | speed-up | file | test defect mIoU | load |",
              "|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        for threads in args.threads:
            reference = unpruned.latency[("torch", size, threads)].median_ms
            for model in models:
                for engine in ENGINES:
                    r = model.latency[(engine, size, threads)]
                    lines.append(f"| {model.label} | {ENGINE_LABEL[engine]} | {size} | {threads} | {r.median_ms:.1f} "
                                 f"({r.p10_ms:.1f}-{r.p90_ms:.1f}) | {reference / r.median_ms:.1f}x | "
                                 f"{mib(model.sizes[engine])} | {points(model.miou[(engine, size)])} | "
                                 f"{model.load[(engine, size, threads)]:.1f} |")
    lines += ["", "## Goal", ""]
    goal_size = GOAL_SIZE if GOAL_SIZE in args.sizes else max(args.sizes)
    int8_miou, fp32_miou = pruned.miou[("onnxruntime_int8", goal_size)], pruned.miou[("torch", goal_size)]
    drop = None if int8_miou is None or fp32_miou is None else fp32_miou - int8_miou
    accuracy_met = drop is not None and drop <= GOAL_POINTS
    for threads in args.threads:
        speedup = (unpruned.latency[("torch", goal_size, threads)].median_ms
                   / pruned.latency[("onnxruntime_int8", goal_size, threads)].median_ms)
        met = speedup >= GOAL_SPEEDUP
        lines.append(f"- {goal_size} px, {threads} thread(s): pruned INT8 ONNX Runtime is **{speedup:.1f}x** faster "
                     f"than the unpruned fp32 PyTorch model (goal {GOAL_SPEEDUP:g}x: {'met' if met else 'NOT met'}).")
    lines.append(f"- {goal_size} px accuracy: pruned INT8 {points(int8_miou)} against pruned fp32 (PyTorch) "
                 f"{points(fp32_miou)} test defect mIoU: {'a drop of ' + points(drop) if drop is not None else 'n/a'} "
                 f"points (goal at most {GOAL_POINTS:g}: {'met' if accuracy_met else 'NOT met'}).")
    for size in args.sizes:
        if size == goal_size:
            continue
        i8, f32 = pruned.miou[("onnxruntime_int8", size)], pruned.miou[("torch", size)]
        if i8 is not None and f32 is not None:
            lines.append(f"- At {size} px the pruned model's INT8 - fp32 difference is {i8 - f32:+.2f} points.")
    for size in args.sizes:
        agree = [abs((m.miou[("onnxruntime", size)] or 0) - (m.miou[("torch", size)] or 0)) for m in models]
        lines.append(f"- fp32 ONNX Runtime and PyTorch scores agree to {max(agree):.3f} points at {size} px "
                     "(the evaluator's check: the same logits give the same metric).")
    lines += [""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="unpruned checkpoint (with --pruned)")
    parser.add_argument("--pruned", type=Path, help="its pruned checkpoint (80%% fewer MACs)")
    parser.add_argument("--format", help="dataset format (default: the baseline's)")
    parser.add_argument("--root", help="dataset folder (default: the baseline's)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--limit", type=int, help="at most this many test images")
    parser.add_argument("--epochs", type=int, default=20, help="baseline training epochs (trained here)")
    parser.add_argument("--train-size", type=int, default=128, help="baseline training size (trained here)")
    parser.add_argument("--scoring-steps", type=int, default=30, help="scoring-network steps per prune round")
    parser.add_argument("--recover-epochs", type=int, default=3, help="recovery epochs after the last round")
    parser.add_argument("--round-to", type=int, default=None,
                        help="kept channel counts as multiples of this (default: the CPU's convolution block)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px, a 40-image dataset, few runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if (args.baseline is None) != (args.pruned is None):
        parser.error("--baseline and --pruned go together")
    if args.round_to is None:
        from core.allocation.latency import channel_block

        args.round_to = channel_block("onnxruntime")
    elif args.round_to < 1:
        parser.error("--round-to takes a whole number of at least 1")
    if args.quick:
        args.sizes, args.runs, args.warmup, args.epochs, args.train_size = [64], 3, 1, 1, 64
        args.calibration_images, args.scoring_steps, args.recover_epochs = 4, 5, 0
        args.work = args.work.with_name(args.work.name + "-quick")
    args.out = args.out or (args.work / "deploy-quick.md" if args.quick else DEFAULT_OUT)
    args.command = "python bench/deploy.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, load_start = time.perf_counter(), load_average()
    work = args.work
    os.environ["DEFECTPRUNE_WORKSPACE"] = str(work / "workspace")  # the synthetic cache the training used
    provenance: list[str] = []
    summary: dict[str, Any] = {}
    if args.baseline is None:
        baseline, pruned, provenance, summary = train_and_prune(args, work)
    else:
        baseline, pruned = args.baseline, args.pruned
    models = [Model("unpruned", Path(baseline)), Model("pruned", Path(pruned))]
    info = measure(args, models, work)
    text = report(args, models, info, provenance, summary, time.perf_counter() - start, (load_start, load_average()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
