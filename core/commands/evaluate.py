"""``python -m core evaluate --checkpoint DIR [--format F --root P] [--split test] [--json]``:
metrics of a checkpoint on a dataset split (`core.services.evaluate`). Format, root and split
seed default to those in the checkpoint's spec, and the input size to the size the model was
trained at (the format's default size when another format is given)."""

from __future__ import annotations

import argparse

from core.cli import add_request_command, print_json, request_from_args
from core.commands.train import format_metrics
from core.services.evaluate import EvaluateRequest, run_evaluate


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_request_command(sub, "evaluate", "metrics of a checkpoint on a dataset split", EvaluateRequest, run)


def run(args: argparse.Namespace) -> int:
    from core.train import ProgressBar

    request = request_from_args(EvaluateRequest, args)
    with ProgressBar(f"evaluate {request.split}") as bar:
        result = run_evaluate(request, progress=bar)
    report = result.to_json()
    if args.json:
        print_json(report)
        return 0
    size = report["size"]
    print(f"{request.checkpoint} on {report['format']} {request.split} ({result.evaluation.images} images, "
          f"{size[0]}x{size[1]})")
    print(format_metrics(request.split, result.evaluation.metrics.to_dict()))
    if request.per_image:
        print(f"per-image table: {request.per_image}")
    return 0
