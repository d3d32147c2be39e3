"""``python -m core data info --format F --root P [--size N] [--json]``."""

from __future__ import annotations

import argparse
import warnings

from core.cli import add_strict_argument, print_json, seed_int
from core.data.base import parse_size
from core.data.registry import format_names, load_index
from core.services.request import parse_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser("info", help="classes, images per split and per class, warnings")
    info.add_argument("--format", required=True, choices=format_names())
    info.add_argument("--root", default=None, help="dataset folder (synthetic: generation cache)")
    info.add_argument("--size", default=None, help="input size N or HxW (default: the format's)")
    info.add_argument("--seed", type=seed_int, default=0, help="split seed")
    info.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="a format option, VALUE as JSON where it parses (repeatable), e.g. "
                           "category=bottle, class_names='[\"background\",\"scratch\"]', "
                           "colours='[[0,0,0],[255,0,0]]', threshold=128")
    add_strict_argument(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    options = parse_options(getattr(args, "option", []) or [])
    with warnings.catch_warnings():  # skipped files are listed in the output itself
        warnings.simplefilter("ignore")
        index = load_index(args.format, args.root, seed=args.seed, strict=args.strict, **options)
    size = parse_size(args.size, index.default_size)
    payload = {
        "format": index.format,
        "root": str(index.root),
        "classes": index.classes,
        "splits": index.split_counts(),
        "images_per_class": index.images_per_class(),
        "size": list(size),
        "skipped": index.skipped,
        "warnings": index.warnings,
    }
    if args.json:
        print_json(payload)
        return 0
    print(f"{index.format} at {index.root}: {len(index.samples)} images, input size {size[0]}x{size[1]}")
    print("classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(index.classes)))
    print("splits: " + ", ".join(f"{k} {v}" for k, v in payload["splits"].items()))
    print("images per class: " + ", ".join(f"{k} {v}" for k, v in payload["images_per_class"].items()))
    for item in index.skipped:
        print(f"skipped {item['file']}: {item['reason']}")
    for warning in index.warnings:
        print(f"warning: {warning}")
    return 0
