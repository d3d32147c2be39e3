"""``python -m core data info --format F --root P [--size N] [--json]`` (`core.services.datasets`)."""

from __future__ import annotations

import argparse

from core.cli import add_request_command, print_json, request_from_args
from core.services.datasets import DatasetInfoRequest, describe_dataset


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    add_request_command(data_sub, "info", "classes, images per split and per class, warnings", DatasetInfoRequest,
                        run_info)


def run_info(args: argparse.Namespace) -> int:
    info = describe_dataset(request_from_args(DatasetInfoRequest, args))
    if args.json:
        print_json(info.to_json())
        return 0
    size = info.size
    print(f"{info.format} at {info.root}: {info.images} images, input size {size[0]}x{size[1]}")
    print("classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(info.classes)))
    print("splits: " + ", ".join(f"{k} {v}" for k, v in info.splits.items()))
    print("images per class: " + ", ".join(f"{k} {v}" for k, v in info.images_per_class.items()))
    for item in info.skipped:
        print(f"skipped {item['file']}: {item['reason']}")
    for warning in info.warnings:
        print(f"warning: {warning}")
    return 0
