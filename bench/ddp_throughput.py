"""Data-parallel step throughput (issue 18, "Scaling out"): ``python -m core train`` as two
torchrun processes (gloo, 1 CPU thread each) against one process with 2 threads (and, for
reference, one process with 1 thread), on the same data, batch size (per process) and number
of steps.

    .venv/bin/python bench/ddp_throughput.py [--size 128] [--batch-size 8] [--steps 30]
        [--images 700] [--repeats 2] [--work DIR] [--out bench/results/ddp_throughput.md]

Each run is the product's own command line (written into the report) with ``--epochs 1
--max-steps-per-epoch STEPS --json``; the figure is the run's ``train_step_seconds`` (rank 0's
mean wall time of one training step: loading the batch, forward, backward with DDP's gradient
all-reduce, the optimiser step), turned into images per second: processes x batch / step
time. The set-ups are run in turns (2 threads, 1 thread, DDP, 2 threads, ...) and the 1-minute load
average is recorded before each run: the machine may be shared, and a CPU figure on it is only
as good as the cores that were free. This is a CPU number; it says nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path.home() / "defectprune-bench" / "ddp_throughput"
DEFAULT_OUT = REPO / "bench" / "results" / "ddp_throughput.md"
SINGLE = "1 process x 2 threads"
ONE_THREAD = "1 process x 1 thread (reference)"
DDP = "2 processes (torchrun, gloo) x 1 thread"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(args: argparse.Namespace, out: Path, threads: int) -> list[str]:
    return ["train", "--format", args.format, "--root", str(args.work / "data"), "--option",
            f"num_images={args.images}", "--size", str(args.size), "--batch-size", str(args.batch_size),
            "--epochs", "1", "--max-steps-per-epoch", str(args.steps), "--threads", str(threads), "--device", "cpu",
            "--out", str(out), "--json"]


def setups(args: argparse.Namespace, repeat: int) -> list[dict[str, Any]]:
    single_out = args.work / f"single-r{repeat}"
    one_out = args.work / f"single1-r{repeat}"
    ddp_out = args.work / f"ddp-r{repeat}"
    return [
        {"label": SINGLE, "processes": 1, "threads": 2,
         "command": [sys.executable, "-m", "core", *train_args(args, single_out, 2)], "out": single_out},
        {"label": ONE_THREAD, "processes": 1, "threads": 1,
         "command": [sys.executable, "-m", "core", *train_args(args, one_out, 1)], "out": one_out},
        {"label": DDP, "processes": 2, "threads": 1,
         "command": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                     str(free_port()), "-m", "core", *train_args(args, ddp_out, 1)], "out": ddp_out},
    ]


def run_one(setup: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import shutil

    shutil.rmtree(setup["out"], ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(setup["threads"]),
               DEFECTPRUNE_DATA_ROOTS=os.pathsep.join(filter(None, [os.environ.get("DEFECTPRUNE_DATA_ROOTS"),
                                                                     str(args.work)])))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(setup["command"], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {shlex.join(setup['command'])} failed:\n{proc.stderr[-3000:]}")
    payload = json.loads(proc.stdout)
    step = payload["train_step_seconds"]
    images = setup["processes"] * args.batch_size
    return {"label": setup["label"], "processes": setup["processes"], "step_s": step, "images_per_s": images / step,
            "wall_s": wall, "load_before": load_before, "load_after": os.getloadavg()[0],
            "command": shlex.join(["python" if c == sys.executable else c for c in setup["command"]])}


def oversubscribed(runs: list[dict[str, Any]]) -> str:
    """A warning paragraph when the machine was busier than its cores in every run."""
    cores = os.cpu_count() or 1
    lowest = min(min(r["load_before"], r["load_after"]) for r in runs)
    if lowest <= cores:
        return ""
    return (f"**Read with care:** the load average stayed above the {cores} cores in every run (lowest "
            f"{lowest:.2f}): the cores were oversubscribed by other work. A process running 2 OpenMP threads "
            "loses most to that (its threads wait for each other at every layer when one is descheduled), "
            "so the 2-thread row is pessimistic and the ratio against it overstates what data parallelism "
            "gains on an idle machine; the 1-thread reference is the fairer comparison here. Rerun on a quiet "
            "machine for the figure to quote.\n\n")


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    import torch

    labels = list(dict.fromkeys(r["label"] for r in runs))
    rows = []
    medians = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        medians[label] = statistics.median(r["images_per_s"] for r in mine)
        for r in mine:
            rows.append(f"| {label} | {r['step_s'] * 1000:.0f} | {r['images_per_s']:.1f} | {r['wall_s']:.0f} | "
                        f"{r['load_before']:.2f} / {r['load_after']:.2f} |")
    single, one, ddp = medians[SINGLE], medians[ONE_THREAD], medians[DDP]
    commands = "\n".join(dict.fromkeys(r["command"] for r in runs[:3]))
    return f"""# Data-parallel step throughput (CPU, gloo)

`{shlex.join(['python', 'bench/ddp_throughput.py', *args.argv])}` on {platform.node() or 'this machine'}
({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}),
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.

Setting: `{args.format}` at {args.size} px ({args.images} generated images), batch {args.batch_size} per process,
{args.steps} training steps per run, fp32 on the CPU, U-Net/ResNet-18 (the default model). Step time is
rank 0's mean wall time of one training step (`train_step_seconds`, the first, warm-up step included);
images/s = processes x batch / step time. The set-ups ran in turns, {args.repeats} time(s) each; the load average (1 min) is the machine's, taken
before / after each run (other work on a shared machine takes cores from both set-ups).

| set-up | step (ms) | images/s | wall (s) | load before / after |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

Median images/s: {single:.1f} (1 process x 2 threads) against {ddp:.1f} (2 processes x 1 thread):
**{ddp / single:.2f}x**; against one process on one thread (the reference: what each rank has)
{ddp / one:.2f}x. Each DDP step also carries twice the images (the effective batch is 2 x
{args.batch_size}), so at equal images per second it takes half as many steps per epoch.

{oversubscribed(runs)}Commands (one of each):

```
{commands}
```
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="synthetic-steel")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=700,
                        help="generated images: enough that each of 2 ranks has --steps batches of its share")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.work = args.work.expanduser().resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):
        for setup in setups(args, repeat):
            result = run_one(setup, args)
            print(f"{result['label']}: {result['step_s'] * 1000:.0f} ms/step, {result['images_per_s']:.1f} images/s "
                  f"(load {result['load_before']:.2f})", flush=True)
            runs.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(args, runs))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
