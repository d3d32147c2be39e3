"""``python -m core profile --checkpoint DIR [--size N|HxW] [--threads T] [--runs R] [--json]``:
parameters, MACs, size on disk and batch-1 latency (PyTorch on the CPU or ``--device``, ONNX Runtime on the CPU)."""

from __future__ import annotations

import argparse

from core.cli import add_device_argument, non_negative_int, positive_int, print_json
from core.data.base import parse_size
from core.models.checkpoint import load_checkpoint
from core.profile import DEFAULT_RUNS, DEFAULT_THREADS, DEFAULT_WARMUP, profile_model
from core.train import resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("profile", help="cost of a checkpoint: params, MACs, size, CPU latency")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    parser.add_argument("--size", default=None, help="input size N or HxW (default: the checkpoint's)")
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS, help="CPU threads while timing")
    parser.add_argument("--runs", type=positive_int, default=DEFAULT_RUNS, help="timed runs per engine")
    parser.add_argument("--warmup", type=non_negative_int, default=DEFAULT_WARMUP, help="untimed runs first")
    add_device_argument(parser, default="cpu",
                        help="where PyTorch latency is timed (default cpu, the edge target; "
                             "ONNX Runtime always times on the CPU)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime timing")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    size = parse_size(args.size, tuple(loaded.spec.input_size))
    result = profile_model(
        loaded.model, loaded.spec, checkpoint_dir=loaded.path, runs=args.runs, warmup=args.warmup,
        threads=args.threads, input_size=size, onnx=not args.no_onnx, progress=not args.json,
        device=resolve_device(args.device),
    )
    payload = {
        "checkpoint": str(loaded.path),
        "arch": loaded.spec.arch,
        "encoder": loaded.spec.encoder,
        "pruned": bool(loaded.history),
        **result,
    }
    if args.json:
        print_json(payload)
        return 0
    spec = loaded.spec
    print(f"{payload['checkpoint']}: {spec.arch}-{spec.encoder}, {spec.in_channels} channel(s), "
          f"{len(spec.classes)} classes, {'pruned' if loaded.history else 'unpruned'}")
    print(f"input {size[0]}x{size[1]}: {result['params'] / 1e6:.3f} M params, "
          f"{result['macs'] / 1e9:.3f} GMACs ({result['flops'] / 1e9:.3f} GFLOPs), "
          f"{result['size_bytes'] / 2**20:.2f} MiB on disk")
    for engine, stats in result["latency"].items():
        print(f"{engine} ({stats['device']}): median {stats['median_ms']:.2f} ms (p10 {stats['p10_ms']:.2f}, "
              f"p90 {stats['p90_ms']:.2f}) over {stats['runs']} runs, {stats['threads']} thread(s)")
    return 0
