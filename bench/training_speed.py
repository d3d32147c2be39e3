"""Training speed and accuracy per precision: what bf16 autocast and channels_last buy on this machine.

    .venv/bin/python bench/training_speed.py [--sizes 128 256] [--threads 1 2] [--steps 5]
        [--seeds 0 1] [--epochs 8] [--limit 500] [--parts timing accuracy] [--work DIR]

Timing: one AdamW training step (forward, class-weighted CE + Dice loss, backward, update) of the
default model (Unet-resnet18, batch 16, 3 channels, 4 classes) on seeded random images, for every
precision (fp32, bf16 autocast) x memory format (contiguous, channels_last) x torch thread count
x input size; the median of ``--steps`` steps after two warm-up steps. This is the loop `fit`
runs (core.train: ``autocast`` and ``to_channels_last`` from core.precision).

Accuracy: the same baseline trained by ``python -m core train`` in fp32 and in bf16 (channels_last
both; ``--precision``), for each seed, on NEU-Seg at 128 px (synthetic steel when NEU-Seg is
absent), then evaluated on the whole test split: the bf16-minus-fp32 difference per seed beside
the seed-to-seed spread of each precision. Checkpoints and timings are cached under ``--work``;
writes ``bench/results/training_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.baseline import SHARED_DEFAULT, epochs_option, run_core, train_baseline  # noqa: E402

PRECISIONS = ("fp32", "bf16")
FORMATS = ("contiguous", "channels_last")


def step_seconds(size: int, threads: int, precision: str, memory_format: str, steps: int) -> float:
    """Median seconds of one training step of the default model."""
    from core.models.zoo import ModelSpec, build_model
    from core.precision import autocast, to_channels_last
    from core.train import SegmentationLoss, TorchThreads

    with TorchThreads(threads):
        torch.manual_seed(0)
        model = build_model(ModelSpec(classes=["background", "a", "b", "c"], input_size=(size, size))).train()
        images = torch.randn(16, 3, size, size)
        masks = torch.randint(0, 4, (16, size, size))
        if memory_format == "channels_last":
            to_channels_last(model)
            images = images.contiguous(memory_format=torch.channels_last)
        loss_fn = SegmentationLoss(torch.ones(4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast("cpu", precision):
                logits = model(images)
            loss_fn(logits, masks).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def timing(args: argparse.Namespace) -> list[dict]:
    cache = args.work / "timing.json"
    rows = json.loads(cache.read_text()) if cache.is_file() else []
    done = {(r["size"], r["threads"], r["precision"], r["memory_format"]) for r in rows}
    for size in args.sizes:
        for threads in args.threads:
            for precision in PRECISIONS:
                for memory_format in FORMATS:
                    key = (size, threads, precision, memory_format)
                    if key in done:
                        continue
                    load = os.getloadavg()[0]
                    seconds = step_seconds(size, threads, precision, memory_format, args.steps)
                    rows.append({"size": size, "threads": threads, "precision": precision,
                                 "memory_format": memory_format, "seconds": seconds, "load_before": load})
                    print(f"{size} px, {threads} thread(s), {precision}, {memory_format}: {seconds:.3f} s/step",
                          flush=True)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    cache.write_text(json.dumps(rows, indent=2))
    return rows


def accuracy(args: argparse.Namespace) -> tuple[list[dict], str]:
    root = args.data / "neu-seg"
    fmt = "neu-seg" if root.is_dir() else "synthetic-steel"
    if fmt != "neu-seg":
        root = args.work / "synthetic"
    rows = []
    for seed in args.seeds:
        for precision in PRECISIONS:
            base = argparse.Namespace(arch="unet", encoder="resnet18", size="128", epochs=epochs_option([str(args.epochs)]),
                                      seed=seed, limit=args.limit, precision=precision, schedule="cosine",
                                      device="cpu", lr=1e-3, patience=args.epochs, batch_size=16, workers=0,
                                      threads=1)
            checkpoint, command, _ = train_baseline(fmt, root, base, args.work / "baselines", args.work / "train.log")
            cached = checkpoint.parent / f"{checkpoint.name}.test.json"
            if not cached.is_file():
                cached.write_text(json.dumps(run_core(["evaluate", "--checkpoint", str(checkpoint), "--split", "test"])))
            test = json.loads(cached.read_text())
            history = json.loads((checkpoint / "training_history.json").read_text())
            rows.append({"seed": seed, "precision": precision, "test": test["defect_miou"],
                         "epoch_seconds": history["seconds_per_epoch"], "best_epoch": history["best_epoch"],
                         "command": "python -m core " + shlex.join(command)})
    return rows, fmt


def report(times: list[dict], trained: list[dict], fmt: str | None, args: argparse.Namespace, argv: list[str]) -> str:
    lines = ["# Training speed and accuracy per precision", "",
             "Command: `" + shlex.join(["python", "bench/training_speed.py", *argv]) + "`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, CPU "
             f"(capability {torch.backends.cpu.get_cpu_capability()}). Date {time.strftime('%Y-%m-%d')}.", ""]
    if times:
        lines += ["## Step time", "",
                  f"Unet-resnet18, batch 16, one AdamW step, median of {args.steps} after 2 warm-up steps. "
                  "`load` is the 1-minute load average when the cell started: above the thread count, other "
                  "work shared the cores and the cell is slower than on a quiet machine.", "",
                  "| size | threads | fp32 | fp32 channels_last | bf16 | bf16 channels_last | speed-up (bf16 CL / fp32) | load |",
                  "|---|---|---|---|---|---|---|---|"]
        for size in sorted({r["size"] for r in times}):
            for threads in sorted({r["threads"] for r in times}):
                cell = {(r["precision"], r["memory_format"]): r for r in times
                        if r["size"] == size and r["threads"] == threads}
                if len(cell) < 4:
                    continue
                values = [cell[(p, f)]["seconds"] for p in PRECISIONS for f in FORMATS]
                loads = [cell[(p, f)]["load_before"] for p in PRECISIONS for f in FORMATS]
                lines.append(f"| {size} | {threads} | " + " | ".join(f"{v:.3f} s" for v in values)
                             + f" | {values[0] / values[3]:.2f}x | {min(loads):.1f}-{max(loads):.1f} |")
        lines.append("")
    if trained:
        by = {(r["seed"], r["precision"]): r for r in trained}
        seeds = sorted({r["seed"] for r in trained})
        lines += ["## Accuracy", "",
                  f"{fmt}, 128 px, Unet-resnet18 from scratch, {args.epochs} epochs (cosine; best validation "
                  f"epoch kept), splits capped at {args.limit} images, one thread; test defect mIoU on the "
                  "capped test split.", "",
                  "| seed | fp32 | bf16 | bf16 - fp32 | s/epoch fp32 | s/epoch bf16 |", "|---|---|---|---|---|---|"]
        for seed in seeds:
            a, b = by[(seed, "fp32")], by[(seed, "bf16")]
            lines.append(f"| {seed} | {a['test']:.2f} | {b['test']:.2f} | {b['test'] - a['test']:+.2f} | "
                         f"{a['epoch_seconds']:.0f} | {b['epoch_seconds']:.0f} |")
        if len(seeds) > 1:
            spread = {p: max(by[(s, p)]["test"] for s in seeds) - min(by[(s, p)]["test"] for s in seeds)
                      for p in PRECISIONS}
            gaps = [by[(s, "bf16")]["test"] - by[(s, "fp32")]["test"] for s in seeds]
            mean_gap = statistics.mean(gaps)
            # judged against fp32's own spread: a bf16 seed that collapsed must not widen the yardstick
            verdict = "within" if abs(mean_gap) <= spread["fp32"] else "BEYOND"
            lines += ["", f"Seed-to-seed spread (max - min over seeds): fp32 {spread['fp32']:.2f}, bf16 "
                      f"{spread['bf16']:.2f} points; mean bf16 - fp32 {mean_gap:+.2f} points: {verdict} the "
                      "fp32 seed spread."]
        lines += ["", "Commands:", "", "```", *(r["command"] for r in trained), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["timing", "accuracy"], choices=["timing", "accuracy"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--data", type=Path, default=SHARED_DEFAULT)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "training_speed")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "training_speed.md")
    args = parser.parse_args(argv)
    if min(args.threads) < 1 or args.steps < 1 or max(args.threads) > (os.cpu_count() or 1):
        parser.error(f"--threads takes 1 to {os.cpu_count()} and --steps 1 or more")
    times = timing(args) if "timing" in args.parts else []
    trained, fmt = accuracy(args) if "accuracy" in args.parts else ([], None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(times, trained, fmt, args, argv))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
