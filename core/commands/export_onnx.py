"""``python -m core export-onnx --checkpoint DIR --out FILE.onnx [--size N|HxW] [--json]``:
one ONNX file with a dynamic batch axis, checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from core.cli import checked_number, print_json
from core.data.base import parse_size
from core.models.checkpoint import load_checkpoint
from core.models.groups import example_input
from core.profile import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_onnx, onnx_max_abs_diff

opset_number = checked_number(int, "a whole number", lambda v: MIN_OPSET <= v <= MAX_OPSET, f"{MIN_OPSET} to {MAX_OPSET}")

# Float32 logits of the same network in two runtimes differ by rounding only.
DIFF_WARNING = 1e-3


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export-onnx", help="export a checkpoint to ONNX and check it")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--size", default=None, help="input size N or HxW (default: the checkpoint's)")
    parser.add_argument("--opset", type=opset_number, default=DEFAULT_OPSET,
                        help=f"ONNX opset ({MIN_OPSET} to {MAX_OPSET})")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def export_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``export-onnx`` does except printing (also the run store's export job)."""
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    size = parse_size(args.size, tuple(loaded.spec.input_size))
    channels = loaded.spec.in_channels
    path = export_onnx(loaded.model, args.out, size, channels, opset=args.opset)
    # Batch 2 although the export traced batch 1: proves the batch axis is really dynamic.
    diff = onnx_max_abs_diff(loaded.model, path, example_input(size, channels, batch=2))
    payload = {
        "path": str(path.resolve()),
        "max_abs_diff": diff,
        "opset": args.opset,
        "input_size": list(size),
        "in_channels": channels,
        "size_bytes": path.stat().st_size,
    }
    return payload


def run(args: argparse.Namespace) -> int:
    payload = export_from_args(args)
    diff = payload["max_abs_diff"]
    if diff > DIFF_WARNING:
        print(f"warning: ONNX Runtime differs from PyTorch by {diff:.2e} (more than {DIFF_WARNING:g})",
              file=sys.stderr)
    if args.json:
        print_json(payload)
        return 0
    print(f"wrote {payload['path']} ({payload['size_bytes'] / 2**20:.2f} MiB, opset {args.opset}, "
          f"dynamic batch); max |ONNX Runtime - PyTorch| = {diff:.2e}")
    return 0
