"""``python -m core train --format F --root P --out DIR [...] [--json]``: train a model from
scratch and save it as a checkpoint whose spec remembers the dataset and its val metrics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from core.atomic import check_output_folder, write_json_atomic
from core.cli import (
    add_device_argument, add_precision_argument, add_strict_argument, finite_float, non_negative_finite, positive_float,
    positive_int, print_json, seed_int, workers_count,
)
from core.data.base import parse_size
from core.data.dataset import SegmentationDataset
from core.data.registry import format_names, load_index
from core.errors import DefectPruneError
from core.models.checkpoint import holds_only_checkpoint, save_checkpoint
from core.models.zoo import ARCHITECTURES, DEFAULT_ARCH, DEFAULT_ENCODER, ENCODERS, ModelSpec, build_model
from core.train import (
    EmptySplitError, SCHEDULES, ProgressBar, ProgressCallback, TrainConfig, fit, resolve_device, seed_everything,
)

TRAINING_HISTORY_FILE = "training_history.json"


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--format", required=required, default=None, choices=format_names())
    parser.add_argument("--root", default=None, help="dataset folder (synthetic: generation cache)")
    parser.add_argument("--size", default=None, help="input size N or HxW (default: the format's)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use at most this many images of each split, drawn seeded from the whole split")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--workers", type=workers_count, default=0,
                        help="data-loading worker processes (at most DEFECTPRUNE_MAX_WORKERS, default the CPU count)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a dataset format option, VALUE as JSON where it parses (repeatable), "
                             "e.g. num_images=24 image_size=64 for a synthetic family")
    add_strict_argument(parser)


def dataset_options(args: argparse.Namespace) -> dict:
    """The ``--option KEY=VALUE`` format options of a command's arguments."""
    from core.commands.data import parse_options

    return parse_options(getattr(args, "option", None) or [])


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a segmentation model and save a checkpoint")
    add_data_arguments(parser)
    parser.add_argument("--split-seed", type=seed_int, default=0,
                        help="seed of the train/val/test split for formats without an official one")
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHITECTURES))
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, choices=ENCODERS)
    parser.add_argument("--in-channels", type=int, choices=[1, 3], default=None,
                        help="model input channels (default: the dataset's native channels)")
    parser.add_argument("--epochs", type=positive_int, default=30)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--weight-decay", type=non_negative_finite, default=1e-4)
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="cosine",
                        help="cosine over --epochs, one-cycle, or plateau: constant rate cut tenfold after "
                             f"every {TrainConfig.plateau_patience} epochs without a better val defect mIoU "
                             "(for training until converged, with --patience)")
    parser.add_argument("--patience", type=positive_int, default=8,
                        help="stop after this many epochs without a better val defect mIoU")
    parser.add_argument("--no-early-stop", action="store_true", help="train every epoch")
    parser.add_argument("--max-steps-per-epoch", type=positive_int, default=None)
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--defect-share", type=finite_float, default=TrainConfig.defect_share,
                        help="images with a defect make at least this share of the draws (0: plain shuffling)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of weights, order and augmentation")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    add_device_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def train_from_args(args: argparse.Namespace, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Everything ``train`` does except printing: shared with the run store's train job,
    which passes its own progress callback. Returns the command's JSON payload."""
    # refuse a bad --out before any data is read or any step is trained (not after the run)
    out = check_output_folder(args.out, "checkpoint", holds_only_checkpoint,
                              protected=[("the dataset folder", args.root)])
    device = resolve_device(args.device)
    options = dataset_options(args)
    index = load_index(args.format, args.root, seed=args.split_seed, strict=args.strict, **options)
    size = parse_size(args.size, index.default_size)
    in_channels = args.in_channels or index.native_channels
    train_ds = SegmentationDataset(index, "train", size, in_channels, augment=not args.no_augment,
                                   seed=args.seed, limit=args.limit)
    val_ds = SegmentationDataset(index, "val", size, in_channels, limit=args.limit)
    for name, dataset in (("train", train_ds), ("val", val_ds)):
        if len(dataset) == 0:
            raise EmptySplitError(
                f"the {name} split of {index.format} at {index.root} has no images; training needs "
                "images in both train and val (add images, or use a format with a seeded split)"
            )
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        schedule=args.schedule, patience=None if args.no_early_stop else args.patience,
        seed=args.seed, num_threads=args.threads, device=str(device),
        max_steps_per_epoch=args.max_steps_per_epoch, num_workers=args.workers, defect_share=args.defect_share,
        precision=args.precision,
    )
    config.validate()
    spec = ModelSpec(
        classes=list(index.classes), arch=args.arch, encoder=args.encoder, in_channels=in_channels,
        input_size=size, dataset_format=index.format,
        dataset_root=str(index.root.resolve()) if args.root is not None else "",
        split_seed=args.split_seed,
    )
    seed_everything(args.seed)  # the initial weights follow the seed too
    model = build_model(spec)
    result = fit(model, train_ds, val_ds, config, progress=progress, class_names=index.classes)
    if result.epochs_run == 0:
        raise DefectPruneError("training was stopped before the first epoch ended; nothing was saved")
    spec.metrics = {"split": "val", **(result.best_val or {}),
                    "training": {"precision": result.precision, "memory_format": result.memory_format,
                                 "epochs_run": result.epochs_run, "best_epoch": result.best_epoch}}

    checkpoint = Path(save_checkpoint(out, model.cpu(), spec))
    write_json_atomic(checkpoint / TRAINING_HISTORY_FILE, {
        "config": {k: v for k, v in vars(config).items()},
        "dataset": {"format": index.format, "root": str(index.root), "split_seed": args.split_seed, "options": options,
                    "train_images": len(train_ds), "val_images": len(val_ds), "size": list(size)},
        "torch_threads": args.threads or torch.get_num_threads(),
        **{k: v for k, v in result.to_dict().items() if k != "val"},
    }, default=str)
    return {
        "checkpoint": str(checkpoint),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "stopped_by_user": result.stopped_by_user,
        "seconds": round(result.seconds, 3),
        "seconds_per_epoch": result.seconds_per_epoch,
        "device": str(device),
        "precision": result.precision,
        "memory_format": result.memory_format,
        "train_step_seconds": result.train_step_seconds,
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "val": result.best_val,
    }


def run(args: argparse.Namespace) -> int:
    with ProgressBar(f"train {args.arch}-{args.encoder}") as bar:
        payload = train_from_args(args, progress=bar)
    if args.json:
        print_json(payload)
        return 0
    print(f"saved {payload['checkpoint']} after {payload['epochs_run']} epoch(s) in {payload['precision']} "
          f"(best epoch {payload['best_epoch']}"
          f"{', stopped early' if payload['stopped_early'] else ''}"
          f"{', stopped by user' if payload['stopped_by_user'] else ''})")
    print(format_metrics("val", payload["val"] or {}))
    return 0


def format_metrics(split: str, metrics: dict) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    per_class = ", ".join(f"{name} {pct(v)}" for name, v in (metrics.get("per_class_iou") or {}).items())
    return (f"{split}: defect mIoU {pct(metrics.get('defect_miou'))}, background IoU "
            f"{pct(metrics.get('background_iou'))}, Dice {pct(metrics.get('dice'))}, pixel accuracy "
            f"{pct(metrics.get('pixel_accuracy'))}; per class IoU: {per_class}")
