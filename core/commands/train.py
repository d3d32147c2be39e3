"""``python -m core train --format F --root P --out DIR [...] [--json]``: train a model from
scratch and save it as a checkpoint whose spec remembers the dataset and its val metrics
(`core.services.train`)."""

from __future__ import annotations

import argparse

from core.cli import add_request_command, print_json, request_from_args
from core.services.train import TrainRequest, run_train


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_request_command(sub, "train", "train a segmentation model and save a checkpoint", TrainRequest, run)


def run(args: argparse.Namespace) -> int:
    from core.train import ProgressBar, distributed

    request = request_from_args(TrainRequest, args)
    with distributed.launched(request.device):  # under torchrun: one rank of a data-parallel run
        with ProgressBar(f"train {request.arch}-{request.encoder}") as bar:
            result = run_train(request, progress=bar if distributed.is_main() else None)
        if not distributed.is_main():  # rank 0 reports
            return 0
    if args.json:
        print_json(result.to_json())
        return 0
    print(f"saved {result.checkpoint} after {result.epochs_run} epoch(s) in {result.precision} "
          f"(best epoch {result.best_epoch}"
          f"{', stopped early' if result.stopped_early else ''}"
          f"{', stopped by user' if result.stopped_by_user else ''})")
    print(format_metrics("val", result.val or {}))
    if result.encoder_weights:
        weights = result.encoder_weights
        left = f"; not loaded: {', '.join(weights['not_loaded'][:5])}" if weights["not_loaded"] else ""
        print(f"encoder initialised from {weights['file']}: {weights['loaded']} of {weights['total']} tensors "
              f"(by {weights['mapping']}){left}")
    return 0


def format_metrics(split: str, metrics: dict) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    per_class = ", ".join(f"{name} {pct(v)}" for name, v in (metrics.get("per_class_iou") or {}).items())
    return (f"{split}: defect mIoU {pct(metrics.get('defect_miou'))}, background IoU "
            f"{pct(metrics.get('background_iou'))}, Dice {pct(metrics.get('dice'))}, pixel accuracy "
            f"{pct(metrics.get('pixel_accuracy'))}; per class IoU: {per_class}")
