"""``python -m core profile --checkpoint DIR [--size N|HxW] [--threads T] [--runs R] [--json]``:
parameters, MACs, size on disk and batch-1 latency (PyTorch on the CPU or ``--device``, ONNX
Runtime on the CPU), by `core.services.profile`."""

from __future__ import annotations

import argparse

from core.cli import add_request_command, print_json, request_from_args
from core.services.profile import ProfileRequest, run_profile


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_request_command(sub, "profile", "cost of a checkpoint: params, MACs, size, CPU latency", ProfileRequest, run)


def run(args: argparse.Namespace) -> int:
    result = run_profile(request_from_args(ProfileRequest, args), progress=not args.json)
    if args.json:
        print_json(result.to_json())
        return 0
    profile, size = result.profile, result.input_size
    print(f"{result.checkpoint}: {result.arch}-{result.encoder}, {result.in_channels} channel(s), "
          f"{len(result.classes)} classes, {'pruned' if result.pruned else 'unpruned'}")
    print(f"input {size[0]}x{size[1]}: {profile['params'] / 1e6:.3f} M params, "
          f"{profile['macs'] / 1e9:.3f} GMACs ({profile['flops'] / 1e9:.3f} GFLOPs), "
          f"{profile['size_bytes'] / 2**20:.2f} MiB on disk")
    for engine, stats in profile["latency"].items():
        print(f"{engine} ({stats['device']}): median {stats['median_ms']:.2f} ms (p10 {stats['p10_ms']:.2f}, "
              f"p90 {stats['p90_ms']:.2f}) over {stats['runs']} runs, {stats['threads']} thread(s)")
    return 0
