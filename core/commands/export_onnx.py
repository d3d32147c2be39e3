"""``python -m core export-onnx --checkpoint DIR --out FILE.onnx [--size N|HxW] [--int8
[--calibration-images N] [--calibration-seed S] [--format F --root DIR --option K=V]] [--json]``:
one ONNX file with a dynamic batch axis, checked against PyTorch with ONNX Runtime
(`core.services.export`, without the export job's profile: that is ``python -m core profile``).
With ``--int8`` the file is ONNX Runtime's static INT8 quantisation of that export (QDQ,
per-channel weights), calibrated on seeded training images of the model's dataset."""

from __future__ import annotations

import argparse
import sys

from core.cli import add_request_command, print_json, request_from_args
from core.services.export import ExportRequest, run_export

# Float32 logits of the same network in two runtimes differ by rounding only.
DIFF_WARNING = 1e-3


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_request_command(sub, "export-onnx", "export a checkpoint to ONNX (fp32, or INT8 with --int8) and check it",
                        ExportRequest, run)


def run(args: argparse.Namespace) -> int:
    result = run_export(request_from_args(ExportRequest, args, no_profile=True))
    diff = result.max_abs_diff
    if diff > DIFF_WARNING:
        print(f"warning: ONNX Runtime differs from PyTorch by {diff:.2e} (more than {DIFF_WARNING:g})",
              file=sys.stderr)
    if args.json:
        print_json(result.to_json())
        return 0
    if result.int8 is not None:
        settings = result.int8["quantization"]
        print(f"wrote {result.path} (INT8 {settings['format']}, {result.size_bytes / 2**20:.2f} MiB against "
              f"{result.int8['fp32_size_bytes'] / 2**20:.2f} MiB fp32, opset {result.opset}, dynamic batch), "
              f"calibrated on {settings['calibration_images']} {settings['calibration_split']} images of "
              f"{settings['calibration_dataset']} (seed {settings['calibration_seed']}); the fp32 export it "
              f"quantises: max |ONNX Runtime - PyTorch| = {diff:.2e}")
        return 0
    print(f"wrote {result.path} ({result.size_bytes / 2**20:.2f} MiB, opset {result.opset}, "
          f"dynamic batch); max |ONNX Runtime - PyTorch| = {diff:.2e}")
    return 0
