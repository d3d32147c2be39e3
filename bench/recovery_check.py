"""Recovery check: issue 13's throwaway calibration reproduced with the product's own loop.

    .venv/bin/python bench/recovery_check.py [--data ../shared/datasets] [--epochs 20] [--limit 1000]
        [--recover-epochs 10] [--recover-lr 0.001] [--distill 0.7] [--threads 1] [--work DIR]

NEU-Seg at 128 px, Unet-resnet18 trained from scratch (`bench/baseline.py`'s cached `python -m
core train`, one-cycle, bf16 where the CPU runs it fast), then `python -m core prune` to 80% fewer
MACs in two rounds (step 0.56, one fine-tune epoch each) for uniform L1 and the method, and the
product's recovery phase (`--recover-epochs`) on each result, with and without distillation from
the unpruned model. The recovery variants resume the same rounds (a copy of the run's folder: the
loop continues after its last finished round, so only the recovery differs). The control is the
unpruned model fine-tuned with the recovery's own schedule for as many epochs. Test split in
full. Writes `bench/results/recovery_check.md`; everything is cached under `--work`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.baseline import SHARED_DEFAULT, epochs_option, resolved_precision, run_core, train_baseline  # noqa: E402
from bench.resume_copy import truncated_copy  # noqa: E402

METHODS = ["uniform-l1", "collaborative"]


def prune_command(method: str, checkpoint: Path, out: Path, args: argparse.Namespace, recover: int,
                  distill: float) -> list[str]:
    return ["prune", "--checkpoint", str(checkpoint), "--method", method, "--target-macs", "0.8", "--step", "0.56",
            "--no-tolerance-stop", "--finetune-epochs", "1", "--scoring-steps", str(args.scoring_steps),
            "--recover-epochs", str(recover), "--recover-lr", str(args.recover_lr),
            "--recover-distill-weight", str(distill), "--size", "128", "--batch-size", "16",
            "--threads", str(args.threads), "--limit", str(args.limit), "--seed", "0", "--out", str(out)]


def run_prune(command: list[str], out: Path, log: Path) -> dict:
    state = out / "rounds.json"
    if not (state.is_file() and "result" in json.loads(state.read_text())):
        print("python -m core " + shlex.join(command), flush=True)
        run_core(command, log)
    return json.loads(state.read_text())


def control(checkpoint: Path, args: argparse.Namespace, out: Path) -> dict:
    """The unpruned model fine-tuned with the recovery's schedule, rate and epochs."""
    from core.services.datasets import index_for_checkpoint
    from core.data.dataset import SegmentationDataset
    from core.models.checkpoint import load_checkpoint
    from core.train import TrainConfig, evaluate, fine_tune

    done = out / "control.json"
    if done.is_file():
        return json.loads(done.read_text())
    loaded = load_checkpoint(checkpoint)
    spec = loaded.spec
    index, _ = index_for_checkpoint(checkpoint, spec, None, None, None, None)
    splits = {s: SegmentationDataset(index, s, tuple(spec.input_size), spec.in_channels, augment=s == "train",
                                     seed=0, limit=args.limit, normalisation=spec.normalisation)
              for s in ("train", "val", "test")}
    config = TrainConfig(epochs=args.recover_epochs, batch_size=16, lr=args.recover_lr, patience=None, seed=999_999,
                         num_threads=args.threads, schedule="cosine", warmup_fraction=0.05)
    start = time.perf_counter()
    tuned = fine_tune(loaded.model, splits["train"], splits["val"], config, class_names=spec.classes)
    test = evaluate(loaded.model, splits["test"], class_names=spec.classes, per_image=False).metrics.to_dict()
    result = {"val": tuned.best_val, "test": test, "precision": tuned.precision, "wall_s": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


def baseline_test(checkpoint: Path) -> dict:
    cached = checkpoint.parent / f"{checkpoint.name}.test.json"
    if not cached.is_file():
        cached.write_text(json.dumps(run_core(["evaluate", "--checkpoint", str(checkpoint), "--split", "test"]), indent=2))
    return json.loads(cached.read_text())


def miou_all(metrics: dict) -> float:
    """mIoU over every class, background included (how FDSNet and most papers report)."""
    values = [v for v in metrics["per_class_iou"].values() if v is not None]
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DEFAULT)
    parser.add_argument("--epochs", type=int, default=20, help="baseline epochs (one-cycle)")
    parser.add_argument("--limit", type=int, default=1000, help="images per split")
    parser.add_argument("--recover-epochs", type=int, default=10)
    parser.add_argument("--recover-lr", type=float, default=1e-3)
    parser.add_argument("--distill", type=float, default=0.7, help="distillation weight of the distilled variant")
    parser.add_argument("--distill-methods", nargs="+", default=["collaborative"])
    parser.add_argument("--scoring-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "recovery_check")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recovery_check.md")
    args = parser.parse_args(argv)
    root = args.data / "neu-seg"
    if not root.is_dir():
        print(f"skipped: {root} is absent (the real datasets live in ../shared/datasets)")
        return 1
    start = time.perf_counter()
    base_args = argparse.Namespace(arch="unet", encoder="resnet18", size="128", epochs=epochs_option([str(args.epochs)]),
                                   seed=0, limit=args.limit, precision="auto", schedule="onecycle", device="cpu",
                                   lr=1e-3, patience=args.epochs, batch_size=16, workers=0, threads=args.threads)
    log = args.work / "log.txt"
    checkpoint, train_cmd, _ = train_baseline("neu-seg", root, base_args, args.work / "baseline", log)
    base = baseline_test(checkpoint)
    rows, commands = [], ["python -m core " + shlex.join(train_cmd)]
    for method in METHODS:
        rounds_dir = args.work / method / "rounds"
        command = prune_command(method, checkpoint, rounds_dir, args, 0, 0.0)
        commands.append("python -m core " + shlex.join(command))
        state = run_prune(command, rounds_dir, log)
        before, finished_rounds = state["result"], len(state["rounds"])
        rows.append((method, "none (after the last round)", before, before["test"]))
        for distill in [0.0] + ([args.distill] if method in args.distill_methods else []):
            out = args.work / method / f"recover-e{args.recover_epochs}-d{distill:g}"
            # the same rounds, resumed: the loop goes straight to the recovery
            truncated_copy(rounds_dir, out, finished_rounds)
            command = prune_command(method, checkpoint, out, args, args.recover_epochs, distill)
            commands.append("python -m core " + shlex.join(command) + "   # on a copy of the rounds")
            recovered = run_prune(command, out, log)
            rows.append((method, f"{args.recover_epochs} epochs, distillation {distill:g}", recovered["recovery"],
                         recovered["result"]["test"]))
    ctrl = control(checkpoint, args, args.work / "control")

    reference = max(base["defect_miou"], ctrl["test"]["defect_miou"])
    lines = ["# Recovery check (issue 13's calibration, the product's own loop)", "",
             "Command: `" + shlex.join(["python", "bench/recovery_check.py", *argv]) + "`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, CPU, "
             f"{args.threads} torch thread(s), training precision {resolved_precision(base_args)}. "
             f"Wall time {(time.perf_counter() - start) / 60:.1f} min (cached parts not redone). "
             f"Date {time.strftime('%Y-%m-%d')}.", "",
             f"NEU-Seg, 128 px, every split capped at {args.limit} images (NEU-Seg has train 3129, val 894, test 447), "
             f"baseline {args.epochs} epochs one-cycle; two rounds to 80% fewer MACs with one fine-tune epoch each, "
             f"then the recovery phase ({args.recover_epochs} epochs, lr {args.recover_lr:g}, 5% warm-up, cosine, "
             "best validation epoch kept). One seed: differences of a point or "
             "two are within seed spread (issue 13 section 5).", "",
             f"Baseline: test defect mIoU {base['defect_miou']:.2f} (mIoU with background {miou_all(base):.2f}); "
             f"control ({args.recover_epochs} more epochs, the recovery's schedule, no pruning): "
             f"{ctrl['test']['defect_miou']:.2f} ({miou_all(ctrl['test']):.2f}). Drops against {reference:.2f}, "
             "the better of the two.", "",
             "| method | recovery | MACs red. | params red. | val defect mIoU | test defect mIoU | drop | "
             "test mIoU (bg incl.) | s/step (of it teacher) | recovery wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, recovery, record, test in rows:
        step = record.get("train_step_seconds")
        teacher = record.get("teacher_step_seconds")
        timing = "-" if step is None else f"{step:.2f}" + (f" ({teacher:.2f})" if teacher else "")
        wall = f"{record['wall_s']:.0f}" if "wall_s" in record else "-"
        lines.append(f"| {method} | {recovery} | {100 * record['macs_reduction']:.1f}% | "
                     f"{100 * record['params_reduction']:.1f}% | {record['defect_miou']:.2f} | "
                     f"{test['defect_miou']:.2f} | {reference - test['defect_miou']:+.2f} | {miou_all(test):.2f} | "
                     f"{timing} | {wall} |")
    lines += ["", "Commands:", "", "```", *commands, "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
