"""Baseline: the default model (Unet with a ResNet-18 encoder, trained from scratch) on NEU-Seg
and magnetic tile at 128 px: test-split accuracy, training time per epoch, and the cost
profile (parameters, MACs, size, batch-1 CPU latency). This is the unpruned reference every
pruning result is compared with.

    .venv/bin/python bench/baseline.py [--datasets neu-seg magnetic-tile] [--epochs 40 [magnetic-tile=30]]
        [--size 128] [--batch-size 16] [--threads 2] [--device auto] [--limit N]

Training and evaluation run the command line itself (``python -m core train`` / ``evaluate``,
printed in the report), so the numbers are those a user gets. Checkpoints are cached under
``bench/cache/`` (git-ignored) by setting, so a rerun skips what is already trained; delete
the folder to start over. The datasets are read from ``../shared/datasets`` beside the
repository (or ``--data``); a missing one is skipped with the reason in the report.
``--limit`` caps every split for a smoke run; its report says so and is no benchmark.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DATASETS = {"neu-seg": "neu-seg", "magnetic-tile": "magnetic-tile"}  # format -> folder
SHARED_DEFAULT = REPO.parent / "shared" / "datasets"
CACHE_DEFAULT = REPO / "bench" / "cache" / "baseline"


def run_core(args: list[str], log: Path | None = None) -> dict:
    """Run ``python -m core ... --json``; progress bars pass through to this terminal, or go to
    ``log`` (appended) when several commands run at once."""
    command = [sys.executable, "-m", "core", *args, "--json"]
    if log is None:
        proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as stderr:
            proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    if proc.returncode != 0:
        where = f" (its output: {log})" if log else ""
        raise RuntimeError(f"{shlex.join(command)} failed with exit code {proc.returncode}{where}")
    return json.loads(proc.stdout)


def display(command: list[str]) -> str:
    return "python -m core " + shlex.join(command)


def format_values(values: list[str], flag: str) -> dict[str | None, int]:
    """``N FORMAT=N ...`` (``--epochs 15 magnetic-tile=30``, ``--size 128 magnetic-tile=256``): a
    default and per-dataset values (key None: the default); ``flag`` names the option in errors."""
    out: dict[str | None, int] = {}
    for value in values:
        fmt, _, count = value.rpartition("=")
        try:
            out[fmt or None] = int(count)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes N or FORMAT=N, not {value!r}") from None
    if None not in out:
        raise argparse.ArgumentTypeError(f"{flag} needs a default N beside any FORMAT=N")
    return out


def epochs_option(values: list[str]) -> dict[str | None, int]:
    """``--epochs`` values parsed by :func:`format_values`."""
    return format_values(values, "--epochs")


class FormatValuesAction(argparse.Action):
    """An ``N FORMAT=N ...`` option (``--epochs``, ``--size``) parsed by :func:`format_values`;
    a bad value is a usage error naming the option."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, format_values(values, option_string or self.dest))
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))


def epochs_for(fmt: str, args: argparse.Namespace) -> int:
    return args.epochs.get(fmt, args.epochs[None])


def resolved_precision(args: argparse.Namespace) -> str:
    """The concrete precision (fp32 or bf16) a baseline trains in: ``auto`` resolved on this
    machine, so cached checkpoints are told apart by what they really ran."""
    from core.precision import resolve_precision
    from core.train import resolve_device

    return resolve_precision(getattr(args, "precision", "fp32"), resolve_device(getattr(args, "device", "auto")))


def baseline_tag(fmt: str, args: argparse.Namespace) -> str:
    """The cache folder name of a baseline: every setting that changes its training."""
    precision = resolved_precision(args)
    schedule = getattr(args, "schedule", "cosine")
    return (f"{fmt}-{args.arch}-{args.encoder}-{args.size}-e{epochs_for(fmt, args)}-s{args.seed}"
            + (f"-l{args.limit}" if args.limit else "")
            # fp32/cosine runs keep their earlier tags, so their caches stay valid
            + (f"-{precision}" if precision != "fp32" else "") + (f"-{schedule}" if schedule != "cosine" else "")
            + (f"-p{args.patience}" if schedule == "plateau" else ""))


def _common(args: argparse.Namespace) -> list[str]:
    common = ["--size", str(args.size), "--batch-size", str(args.batch_size), "--device", args.device,
              "--workers", str(args.workers)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.limit:
        common += ["--limit", str(args.limit)]
    return common


def train_baseline(fmt: str, root: Path, args: argparse.Namespace, cache: Path,
                   log: Path | None = None) -> tuple[Path, list[str], bool]:
    """Train the baseline unless its cached checkpoint is there: (checkpoint, command, reused)."""
    checkpoint = cache / baseline_tag(fmt, args)
    train_cmd = ["train", "--format", fmt, "--root", str(root), "--arch", args.arch,
                 "--encoder", args.encoder, "--epochs", str(epochs_for(fmt, args)), "--seed", str(args.seed),
                 "--lr", str(args.lr), "--patience", str(args.patience), "--out", str(checkpoint), *_common(args),
                 "--precision", resolved_precision(args), "--schedule", getattr(args, "schedule", "cosine")]
    reused = (checkpoint / "training_history.json").is_file()
    if reused:
        print(f"[{fmt}] reusing the trained checkpoint {checkpoint}", flush=True)
    else:
        print(f"[{fmt}] training: {display(train_cmd)}", flush=True)
        run_core(train_cmd, log)
    return checkpoint, train_cmd, reused


def benchmark_dataset(fmt: str, root: Path, args: argparse.Namespace, cache: Path) -> dict:
    tag = baseline_tag(fmt, args)
    checkpoint, train_cmd, reused = train_baseline(fmt, root, args, cache)
    eval_cmd = ["evaluate", "--checkpoint", str(checkpoint), "--split", "test", *_common(args)]
    history = json.loads((checkpoint / "training_history.json").read_text())
    eval_file = checkpoint.parent / f"{tag}.test.json"
    if eval_file.is_file() and reused:
        test = json.loads(eval_file.read_text())
    else:
        print(f"[{fmt}] evaluating: {display(eval_cmd)}", flush=True)
        test = run_core(eval_cmd)
        eval_file.write_text(json.dumps(test, indent=2))

    from core.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    profile = None
    try:
        from core.profile import profile_model

        print(f"[{fmt}] profiling", flush=True)
        profile = profile_model(loaded.model.eval(), loaded.spec, checkpoint_dir=checkpoint,
                                runs=args.latency_runs)
    except ImportError as exc:  # the profiler is optional for this report
        print(f"[{fmt}] no profile: {exc}", flush=True)
    return {"format": fmt, "root": str(root), "checkpoint": str(checkpoint),
            "train_cmd": display(train_cmd), "eval_cmd": display(eval_cmd),
            "history": history, "test": test, "profile": profile, "reused": reused,
            "classes": loaded.spec.classes}


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def report(results: list[dict], skipped: list[tuple[str, str]], args: argparse.Namespace, argv: list[str]) -> str:
    lines = ["# Baseline: unpruned Unet-ResNet-18, trained from scratch", ""]
    if args.limit:
        lines += [f"**Reduced run: every split capped at {args.limit} images (a seeded sample, `--limit`), "
                  "at most " + ", ".join(f"{r['history']['config']['epochs']} epochs ({r['format']})" for r in results)
                  + "; not the full datasets.**", ""]
    lines += [
        "Command: `" + shlex.join(["python", "bench/baseline.py", *argv]) + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"torch {torch.__version__}, device {args.device}"
        f"{' (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() and args.device != 'cpu' else ''}, "
        f"torch threads {args.threads or torch.get_num_threads()}. Date {time.strftime('%Y-%m-%d')}.",
        "",
        "Accuracy on each dataset's test split (IoU in percent, confusion accumulated over the split); "
        "the checkpoint is the epoch with the best validation defect mIoU. Cost at batch 1 and the "
        "training input size; latency is the median of timed CPU runs.",
        "",
        "| dataset | test images | defect mIoU | background IoU | Dice | pixel acc. | epochs (best) | s/epoch | params | MACs | size MB | torch ms | ORT ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, h, p = r["test"], r["history"], r["profile"] or {}
        latency = p.get("latency_ms", {})
        lines.append(
            f"| {r['format']} | {t['images']} | {pct(t['defect_miou'])} | {pct(t['background_iou'])} | "
            f"{pct(t['dice'])} | {pct(t['pixel_accuracy'])} | {h['epochs_run']} ({h['best_epoch']}) | "
            f"{h['seconds_per_epoch']:.1f} | "
            f"{p['params'] / 1e6:.2f} M | {p['macs'] / 1e9:.2f} G | {p['size_bytes'] / 2**20:.1f} | "
            f"{latency.get('torch', float('nan')):.1f} | {latency.get('onnxruntime', float('nan')):.1f} |"
            if p else
            f"| {r['format']} | {t['images']} | {pct(t['defect_miou'])} | {pct(t['background_iou'])} | "
            f"{pct(t['dice'])} | {pct(t['pixel_accuracy'])} | {h['epochs_run']} ({h['best_epoch']}) | "
            f"{h['seconds_per_epoch']:.1f} | n/a | n/a | n/a | n/a | n/a |"
        )
    for r in results:
        t = r["test"]
        lines += ["", f"## {r['format']}", "",
                  "Per-class test IoU: " + ", ".join(f"{k} {pct(v)}" for k, v in t["per_class_iou"].items()),
                  "",
                  f"Training: {r['history']['dataset']['train_images']} train / "
                  f"{r['history']['dataset']['val_images']} val images, "
                  f"{r['history']['seconds']:.0f} s in all"
                  f"{' (checkpoint reused from bench/cache)' if r['reused'] else ''}.",
                  "", "```", r["train_cmd"], r["eval_cmd"], "```"]
    for fmt, reason in skipped:
        lines += ["", f"## {fmt}: skipped", "", reason]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--data", type=Path, default=SHARED_DEFAULT)
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", default="128")
    parser.add_argument("--epochs", nargs="+", action=FormatValuesAction, default=epochs_option(["40"]), metavar="N|FORMAT=N",
                        help="most epochs (early stopping on validation); FORMAT=N for one dataset")
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="training precision (auto: bf16 where the device runs it fast)")
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle", "plateau"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--limit", type=int, default=None, help="images per split (smoke run)")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=CACHE_DEFAULT)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "baseline.md")
    args = parser.parse_args(argv)

    args.cache.mkdir(parents=True, exist_ok=True)
    results, skipped = [], []
    for fmt in args.datasets:
        root = args.data / DATASETS[fmt]
        if not root.is_dir():
            reason = f"dataset folder {root} is absent (the real datasets live in ../shared/datasets)"
            print(f"[{fmt}] skipped: {reason}", flush=True)
            skipped.append((fmt, reason))
            continue
        try:
            results.append(benchmark_dataset(fmt, root, args, args.cache))
        except RuntimeError as exc:
            print(f"[{fmt}] skipped: {exc}", flush=True)
            skipped.append((fmt, str(exc)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(results, skipped, args, argv))
    print(f"wrote {args.out}")
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
