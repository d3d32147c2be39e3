"""``python -m core evaluate --checkpoint DIR [--format F --root P] [--split test] [--json]``:
metrics of a checkpoint on a dataset split. Format, root and split seed default to those in
the checkpoint's spec, and the input size to the size the model was trained at (the
format's default size when another format is given)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.atomic import write_atomic
from core.cli import add_device_argument, print_json, seed_int
from core.commands.train import add_data_arguments, dataset_options, format_metrics
from core.data.base import SPLITS, DatasetIndex, parse_size
from core.data.dataset import SegmentationDataset
from core.data.registry import load_index
from core.errors import DefectPruneError
from core.metrics import EvaluationResult
from core.models.zoo import ModelSpec
from core.train import EmptySplitError, ProgressBar, ProgressCallback, TorchThreads, evaluate, resolve_device


class CheckpointDatasetMismatchError(DefectPruneError):
    pass


def index_for_checkpoint(checkpoint: str | Path, spec: ModelSpec, format_name: str | None, root: str | None,
                         split_seed: int | None, options: dict | None = None,
                         strict: bool = False) -> tuple[DatasetIndex, bool]:
    """The dataset a command runs a checkpoint on: the one in its spec unless another is
    given, refused when its classes differ from the model's. Also says whether it is the
    checkpoint's own format (whose input size then applies)."""
    format_name = format_name or spec.dataset_format
    if not format_name:
        raise DefectPruneError(
            f"checkpoint {checkpoint} does not say which dataset it was trained on; give --format and --root"
        )
    same_format = format_name == spec.dataset_format
    if root is None and same_format:
        root = spec.dataset_root or None
    index = load_index(format_name, root, seed=spec.split_seed if split_seed is None else split_seed,
                       strict=strict, **(options or {}))
    if list(index.classes) != list(spec.classes):
        raise CheckpointDatasetMismatchError(
            f"checkpoint {checkpoint} predicts classes {', '.join(spec.classes)} but {format_name} at "
            f"{index.root} has {', '.join(index.classes)}; use a dataset with the same classes"
        )
    return index, same_format


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("evaluate", help="metrics of a checkpoint on a dataset split")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    add_data_arguments(parser, required=False)
    parser.add_argument("--split", default="test", choices=list(SPLITS))
    parser.add_argument("--split-seed", type=seed_int, default=None,
                        help="split seed (default: the checkpoint's)")
    parser.add_argument("--per-image", default=None, metavar="CSV",
                        help="also write the per-image table to this CSV file")
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def evaluate_from_args(args: argparse.Namespace,
                       progress: ProgressCallback | None = None) -> tuple[dict[str, Any], EvaluationResult]:
    """Everything ``evaluate`` does except printing: shared with the run store's evaluate
    job. Returns the command's JSON payload and the full result (per-image table)."""
    from core.models.checkpoint import load_checkpoint

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    spec, model = loaded.spec, loaded.model
    index, same_format = index_for_checkpoint(args.checkpoint, spec, args.format, args.root, args.split_seed,
                                              dataset_options(args), strict=getattr(args, "strict", False))
    format_name = index.format
    size = parse_size(args.size, tuple(spec.input_size) if same_format else index.default_size)
    dataset = SegmentationDataset(index, args.split, size, spec.in_channels, limit=args.limit)
    if len(dataset) == 0:
        raise EmptySplitError(f"the {args.split} split of {format_name} at {index.root} has no images")
    with TorchThreads(args.threads):
        result = evaluate(model, dataset, device, args.batch_size, progress=progress, class_names=spec.classes,
                          num_workers=args.workers)
    if args.per_image:
        # atomic: a full disk or a kill leaves the previous table (or none), never a partial one
        text = result.per_image.to_csv(index=False).encode("utf-8")
        write_atomic(Path(args.per_image), lambda handle: handle.write(text))
    metrics = result.metrics.to_dict()
    payload = {
        "checkpoint": str(Path(args.checkpoint)),
        "format": format_name,
        "root": str(index.root),
        "split": args.split,
        "size": list(size),
        "images": result.images,
        **metrics,
        "seconds": round(result.seconds, 3),
        "device": str(device),
    }
    return payload, result


def run(args: argparse.Namespace) -> int:
    with ProgressBar(f"evaluate {args.split}") as bar:
        payload, result = evaluate_from_args(args, progress=bar)
    metrics, format_name, size = result.metrics.to_dict(), payload["format"], payload["size"]
    if args.json:
        print_json(payload)
        return 0
    print(f"{args.checkpoint} on {format_name} {args.split} ({result.images} images, {size[0]}x{size[1]})")
    print(format_metrics(args.split, metrics))
    if args.per_image:
        print(f"per-image table: {args.per_image}")
    return 0
