"""Method smoke benchmark: every pruning method through the same prune-retrain loop on a
synthetic family, plus the allocation check of METHOD.md part 2 on NEU-Seg.

    .venv/bin/python bench/method_smoke.py [--family steel] [--epochs 20] [--finetune-epochs 2]
        [--scoring-steps 300] [--threads 2] [--skip-neu] [--neu-train-limit 1000] [--neu-checkpoint DIR]
        [--neu-seeds 0 1]

Part 1: a synthetic family at 128 px, the default model (Unet-resnet18, trained from scratch,
cached under bench/cache/), then each of the six methods walks 50% -> 75% -> 80% fewer MACs
(step 0.5, no tolerance stop, the same fine-tune epochs and seed); the 50% and 80% rounds are
evaluated on the test split. Part 2 (needs ../shared/datasets/neu-seg): the setting of the
METHOD.md prototype: Unet-resnet18 trained on 1000 NEU-Seg images at 128 px, one shot to 80%
fewer MACs with L1 filter choice, 2 fine-tune epochs; scoring-network allocation against
uniform allocation, and the whole method (collaborative filter choice) beside them, for each of
``--neu-seeds`` (the seed of the calibration batch, the scoring network and the fine-tune order),
validation and test split. Results go to bench/results/method_smoke.md with this command line.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from core.allocation.context import ScoringNetworkSettings, StepSettings  # noqa: E402
from core.data.dataset import SegmentationDataset  # noqa: E402
from core.data.registry import load_index  # noqa: E402
from core.models.checkpoint import is_checkpoint, load_checkpoint  # noqa: E402
from core.profile import measure_latency  # noqa: E402
from core.pruning.loop import LoopInputs, LoopSettings, run_prune_loop  # noqa: E402
from core.pruning.methods import METHODS  # noqa: E402
from core.train import TrainConfig, evaluate  # noqa: E402

CACHE = REPO / "bench" / "cache"
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "datasets"


def train_baseline(fmt: str, root: str | None, out: Path, args, limit: int | None) -> Path:
    if is_checkpoint(out):
        return out
    command = [sys.executable, "-m", "core", "train", "--format", fmt, "--size", "128", "--epochs", str(args.epochs),
               "--patience", "6", "--batch-size", "8", "--seed", str(args.seed), "--out", str(out), "--json"]
    if root:
        command += ["--root", root]
    if limit:
        command += ["--limit", str(limit)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out


def datasets(fmt: str, root: str | None, size, in_channels: int, seed: int, train_limit: int | None = None):
    index = load_index(fmt, root, seed=seed)
    return (SegmentationDataset(index, "train", size, in_channels, augment=True, seed=seed, limit=train_limit),
            SegmentationDataset(index, "val", size, in_channels),
            SegmentationDataset(index, "test", size, in_channels))


def loop_settings(args, seed: int | None = None, **overrides) -> LoopSettings:
    seed = args.seed if seed is None else seed
    settings = dict(
        target=0.8, step=0.5, tolerance=100.0, stop_at_tolerance=False, finetune_epochs=args.finetune_epochs,
        max_rounds=3, seed=seed, latency_runs=20,
        step_settings=StepSettings(seed=seed, scoring=ScoringNetworkSettings(steps=args.scoring_steps)),
        finetune=TrainConfig(epochs=args.finetune_epochs, batch_size=8, patience=None, num_threads=args.threads),
    )
    settings.update(overrides)
    return LoopSettings(**settings)


def test_miou(checkpoint: str, test_ds) -> float:
    loaded = load_checkpoint(checkpoint)
    return evaluate(loaded.model, test_ds, class_names=loaded.spec.classes, per_image=False).metrics.defect_miou


def part_methods(args) -> list[str]:
    fmt = f"synthetic-{args.family}"
    base = train_baseline(fmt, None, CACHE / f"{fmt}-unet-resnet18-128-e{args.epochs}-s{args.seed}", args, None)
    loaded = load_checkpoint(base)
    train, val, test = datasets(fmt, None, loaded.spec.input_size, loaded.spec.in_channels, loaded.spec.split_seed)
    base_test = test_miou(str(base), test)
    base_latency = measure_latency(loaded.model, loaded.spec.input_size, loaded.spec.in_channels, runs=20,
                                   threads=1).median_ms
    lines = [f"### {fmt}, Unet-resnet18, 128 px", "",
             f"Unpruned: test defect mIoU {base_test:.2f}, torch latency {base_latency:.1f} ms (1 thread).", "",
             "| method | target | MACs reduction | params reduction | val defect mIoU | test defect mIoU | latency ms | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        out = CACHE / "method_smoke" / f"{fmt}-{method}-s{args.seed}"
        model = load_checkpoint(base).model
        start = time.perf_counter()
        result = run_prune_loop(LoopInputs(model, loaded.spec, list(loaded.history), train, val), out,
                                loop_settings(args, method=method))
        wall = time.perf_counter() - start
        for r in result.rounds:
            if r.round not in (1, 3):
                continue
            target = "50%" if r.round == 1 else "80%"
            lines.append(f"| {method} | {target} | {r.macs_reduction:.1%} | {r.params_reduction:.1%} | "
                         f"{r.defect_miou:.2f} | {test_miou(r.checkpoint, test):.2f} | {r.latency_ms:.1f} | {wall:.0f} |")
        print(lines[-1], flush=True)
    return lines


def part_allocation(args) -> list[str]:
    root = SHARED / "neu-seg"
    if not root.is_dir():
        return ["### NEU-Seg allocation check", "", f"Skipped: {root} not found."]
    base = args.neu_checkpoint or train_baseline(
        "neu-seg", str(root), CACHE / f"neu{args.neu_train_limit}-unet-resnet18-128", args, args.neu_train_limit)
    loaded = load_checkpoint(base)
    train, val, test = datasets("neu-seg", str(root), loaded.spec.input_size, loaded.spec.in_channels,
                                loaded.spec.split_seed, args.neu_train_limit)
    base_val = loaded.spec.metrics.get("defect_miou") or float("nan")
    lines = ["### NEU-Seg allocation check (METHOD.md part 2 setting)", "",
             f"Baseline `{Path(base).name}`: val defect mIoU {base_val:.2f} ({len(train)} training images). "
             "One round to 80% fewer MACs, 2 fine-tune epochs.", "",
             "| allocator | filter choice | seed | MACs reduction | params reduction | val defect mIoU | "
             "test defect mIoU | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    settings = [("uniform", "l1"), ("scoring-network", "l1"), ("scoring-network", "collaborative")]
    test_scores: dict[tuple[str, str], list[float]] = {key: [] for key in settings}
    for seed in args.neu_seeds:
        for allocator, criterion in settings:
            out = CACHE / "method_smoke" / f"neu-oneshot-{allocator}-{criterion}-s{seed}"
            model = load_checkpoint(base).model
            start = time.perf_counter()
            inputs = LoopInputs(model, loaded.spec, list(loaded.history), train, val, test)
            result = run_prune_loop(inputs, out, loop_settings(
                args, seed, method="collaborative", allocator=allocator, criterion=criterion, step=0.8,
                max_rounds=1, finetune_epochs=2))
            r = result.rounds[0]
            test_scores[allocator, criterion].append(result.result["test"]["defect_miou"])
            lines.append(f"| {allocator} | {criterion} | {seed} | {r.macs_reduction:.1%} | {r.params_reduction:.1%} | "
                         f"{r.defect_miou:.2f} | {test_scores[allocator, criterion][-1]:.2f} | "
                         f"{time.perf_counter() - start:.0f} |")
            print(lines[-1], flush=True)
            if (allocator, criterion) == ("scoring-network", "l1") and seed == args.neu_seeds[0]:
                ratios = r.step["allocation"]["keep_ratio"]
                scales = r.step["allocation"]["scale_importance"]
                keep_lines = ["", f"Scoring-network keep ratio per scale (MACs-weighted, seed {seed}): " +
                              ", ".join(f"stride {s}: {v:.2f}" for s, v in scales.items()),
                              "", "Keep ratio per group: " + ", ".join(f"{n} {v:.2f}" for n, v in ratios.items())]
    lines += ["", "Mean test defect mIoU over seeds " + ", ".join(map(str, args.neu_seeds)) + ": " +
              "; ".join(f"{a} + {c} {sum(v) / len(v):.2f}" for (a, c), v in test_scores.items()) + "."]
    return lines + keep_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="steel")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--scoring-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neu-train-limit", type=int, default=1000)
    parser.add_argument("--neu-checkpoint", type=Path, default=None,
                        help="a trained NEU-Seg baseline to use (e.g. from bench/baseline.py)")
    parser.add_argument("--neu-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-neu", action="store_true")
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "method_smoke.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sections = []
    if not args.skip_methods:
        sections += part_methods(args) + [""]
    if not args.skip_neu:
        sections += part_allocation(args)
    command = "python bench/method_smoke.py " + shlex.join(sys.argv[1:])
    header = ["# Method smoke benchmark", "", f"Command: `{command}`", "",
              f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}, CPU only. Wall time {time.perf_counter() - started:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + sections) + "\n")
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
