"""The default demo path, end to end, as a new user meets it: the default synthetic dataset
generated from nothing, a model trained on it with the default settings, and that model on
the test split; how long each took and how good the model is.

    .venv/bin/python bench/demo.py [--threads N] [--work DIR] [--out FILE.md]

Everything goes through the product's own command line (``python -m core data info``,
``train``, ``evaluate``) with no setting but the format, in a fresh temporary workspace, so
the numbers are those of the Model page's defaults and of ``python -m core train --format
synthetic-steel``. Without ``--threads`` torch takes its default thread count, as the
dashboard's training job does (the worker passes no thread count: all cores, or
OMP_NUM_THREADS).

The product's target (issue 16): at least 70 validation defect mIoU within 3 minutes of
training on a 2-core CPU. The machine may be shared: beside every wall time the report gives
the CPU time of the same process and the load average (sampled every 2 s), so a slow run on a
busy machine can be told from a slow program. Writes ``--out`` (default
bench/results/demo.md) with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.data.registry import DEFAULT_FORMAT  # noqa: E402
from core.services.train import recommended_training  # noqa: E402

TARGET_MIOU = 70.0
TARGET_SECONDS = 180.0


class LoadSampler:
    """The 1-minute load average every ``every`` seconds while a stage runs."""

    def __init__(self, every: float = 2.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        s = self.samples
        return f"{min(s):.1f} / {sum(s) / len(s):.1f} / {max(s):.1f}" if s else "n/a"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(name: str, argv: list[str], env: dict[str, str], stages: list[dict]) -> dict:
    """Run ``python -m core ARGV --json``; its progress goes to this terminal (stderr), its
    JSON is returned; wall and CPU time and the load are recorded in ``stages``."""
    command = [sys.executable, "-m", "core", *argv, "--json"]
    print(f"== {name}: {shlex.join(['python', '-m', 'core', *argv])}", file=sys.stderr, flush=True)
    cpu_before, start = children_cpu(), time.perf_counter()
    uptime_before = os.getloadavg()
    with LoadSampler() as load:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"{name} failed with exit status {done.returncode}")
    stages.append({"stage": name, "wall": wall, "cpu": cpu, "load": load.summary(),
                   "uptime_before": uptime_before, "uptime_after": os.getloadavg(),
                   "command": shlex.join(["python", "-m", "core", *argv])})
    print(f"   {wall:.1f} s wall, {cpu:.1f} s CPU, load min/mean/max {load.summary()}", file=sys.stderr, flush=True)
    return json.loads(done.stdout)


def per_class(metrics: dict) -> str:
    return ", ".join(f"{name} {value:.1f}" for name, value in metrics["per_class_iou"].items()
                     if value is not None and name != "background")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default=DEFAULT_FORMAT, help="dataset format (default: the product's default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for training and evaluation (default: torch's, as the dashboard's job)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the workspace (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "demo.md")
    args = parser.parse_args()

    import torch

    from core.precision import resolve_precision

    threads = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory(prefix="defectprune-demo-") as tmp:
        work = args.work or Path(tmp)
        workspace = work / "workspace"
        checkpoint = work / "checkpoint"
        # a fresh workspace: the dataset is generated, not read from an earlier cache
        env = dict(os.environ, DEFECTPRUNE_WORKSPACE=str(workspace), PYTHONPATH=str(REPO))
        stages: list[dict] = []
        info = run_stage("generate the dataset", ["data", "info", "--format", args.format], env, stages)
        trained = run_stage("train with the defaults",
                            ["train", "--format", args.format, "--out", str(checkpoint), *threads], env, stages)
        tested = run_stage("evaluate on test", ["evaluate", "--checkpoint", str(checkpoint), "--split", "test",
                                                *threads], env, stages)
        history = json.loads((checkpoint / "training_history.json").read_text())

    config, val = history["config"], trained["val"]
    fit_seconds, train_stage = trained["seconds"], stages[1]
    torch_threads = history.get("torch_threads") or torch.get_num_threads()
    ok_miou, ok_time = val["defect_miou"] >= TARGET_MIOU, fit_seconds <= TARGET_SECONDS
    recipe = recommended_training(args.format)
    command = "python bench/demo.py " + shlex.join(sys.argv[1:])
    lines = [
        "# The default demo path: default dataset, default training", "",
        f"Command: `{command.strip()}`", "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU(s), torch {torch.__version__} "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), training precision "
        f"{trained['precision']} ({config['precision']} resolved: bf16 only where the CPU has bf16 instructions; "
        f"here {resolve_precision('auto', 'cpu')}), memory format {trained['memory_format']}, "
        f"{torch_threads} torch thread(s){' (torch default, as the dashboard job)' if not args.threads else ''}. "
        f"Date {time.strftime('%Y-%m-%d %H:%M')}.", "",
        f"Dataset: {args.format}, {sum(info['splits'].values())} images of {info['size'][0]} px "
        f"({', '.join(f'{k} {v}' for k, v in info['splits'].items())}); images per class "
        f"{', '.join(f'{k} {v}' for k, v in info['images_per_class'].items() if k != 'background')}.", "",
        f"Training settings (the defaults for {args.format}, `core.services.train.recommended_training`): "
        f"{', '.join(f'{k} {v}' for k, v in recipe.items())}; batch {config['batch_size']}, "
        f"weight decay {config['weight_decay']}, defect share {config['defect_share']}, "
        f"patience {config['patience']}; {trained['train_images']} train / {trained['val_images']} val images.", "",
        "## Result", "",
        f"- Validation defect mIoU **{val['defect_miou']:.1f}** (best epoch {trained['best_epoch']} of "
        f"{trained['epochs_run']}); per class {per_class(val)}.",
        f"- Test defect mIoU **{tested['defect_miou']:.1f}** ({tested['images']} images); per class {per_class(tested)}.",
        f"- Training (the fit: every epoch's training and validation) **{fit_seconds:.0f} s** wall, "
        f"{fit_seconds / 60:.1f} min; the whole train command {train_stage['wall']:.0f} s wall and "
        f"{train_stage['cpu']:.0f} s CPU ({train_stage['cpu'] / max(train_stage['wall'], 1e-9):.2f} cores busy on "
        f"average), load average min/mean/max {train_stage['load']} while it ran.",
        f"- Target: at least {TARGET_MIOU:.0f} val defect mIoU ({'met' if ok_miou else 'NOT met'}) within "
        f"{TARGET_SECONDS / 60:.0f} min of training on a 2-core machine ({'met' if ok_time else 'NOT met'} "
        "on this run's wall clock; with the load above 0 other work shared the cores).", "",
        "## Stages", "",
        "Wall and CPU seconds of each command (CPU: user + system of the process and its threads); load: the "
        "1-minute load average sampled every 2 s while it ran (min / mean / max), and at its start and end "
        "(`uptime`'s three numbers).", "",
        "| stage | wall s | CPU s | load min / mean / max | uptime at start | uptime at end | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in stages:
        ups = [" ".join(f"{x:.2f}" for x in s[key]) for key in ("uptime_before", "uptime_after")]
        lines.append(f"| {s['stage']} | {s['wall']:.1f} | {s['cpu']:.1f} | {s['load']} | {ups[0]} | {ups[1]} | "
                     f"`{s['command']}` |")
    lines += ["", "## Epochs", "", "| epoch | train loss | val defect mIoU | s |", "|---|---|---|---|"]
    for h in history["history"]:
        lines.append(f"| {h['epoch']} | {h['train_loss']:.3f} | {h['val_defect_miou']:.1f} | {h['seconds']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[lines.index("## Result") + 2:lines.index("## Stages") - 1]))
    print(f"wrote {args.out}")
    return 0 if ok_miou else 1


if __name__ == "__main__":
    raise SystemExit(main())
