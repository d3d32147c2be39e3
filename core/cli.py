"""``python -m core ...``: every job the dashboard can start, from the command line.

Each command lives in ``core/commands/<name>.py`` with ``add_parser(subparsers)`` (which sets
``func``) so that commands are added without touching each other. Errors a user can act on
(`DefectPruneError`) and file-system errors (`OSError`: a folder that cannot be written, a full
disk) print one line and exit 2; so do bad arguments (`OneLineParser`).
"""

from __future__ import annotations

import argparse
import math
import importlib
import json
import sys
from typing import Any

from core.atomic import disk_full_message
from core.errors import DefectPruneError

COMMAND_MODULES = ["data", "train", "evaluate", "prune", "profile", "export_onnx", "jobs", "worker"]


def checked_number(convert: type, what: str, ok, requirement: str):
    """An argparse type: ``convert`` the text, then check it, with a message saying why not."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} must be {requirement}")
        return value

    return parse


positive_int = checked_number(int, "a whole number", lambda v: v >= 1, "at least 1")
non_negative_int = checked_number(int, "a whole number", lambda v: v >= 0, "0 or more")
non_negative_float = checked_number(float, "a number", lambda v: v >= 0, "0 or more")
fraction = checked_number(float, "a number", lambda v: 0.0 < v < 1.0, "between 0 and 1 (e.g. 0.8 = 80% fewer)")
unit_interval = checked_number(float, "a number", lambda v: 0.0 <= v <= 1.0, "from 0 to 1")
def workers_count(text: str) -> int:
    """``--workers``: 0 up to the cap (each worker is a process with its own copy of the data)."""
    from core.config import max_workers

    value = non_negative_int(text)
    cap = max_workers()
    if value > cap:
        raise argparse.ArgumentTypeError(f"{value} data-loader workers is more than the limit of {cap} "
                                         "(the CPU count; set DEFECTPRUNE_MAX_WORKERS to change it)")
    return value


# Seeds feed NumPy and torch generators, which take 0 .. 2**32 - 1 (NumPy refuses a negative
# seed with a traceback, torch wraps a huge one silently).
seed_int = checked_number(int, "a whole number", lambda v: 0 <= v < 2**32, "from 0 to 4294967295")
# `float` alone lets nan and inf through, which every comparison then accepts
finite_float = checked_number(float, "a number", math.isfinite, "a finite number")
non_negative_finite = checked_number(float, "a number", lambda v: math.isfinite(v) and v >= 0, "0 or more")
positive_float = checked_number(float, "a number", lambda v: v > 0 and v < float("inf"), "a positive number")


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    from core.precision import PRECISIONS

    parser.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                        help="training forward passes: bf16 autocast with channels_last where the device runs it "
                             "fast (auto), or as asked; evaluation, export and saved weights stay fp32")


def add_strict_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict", action="store_true",
                        help="stop on a mask holding a value its format does not define (default: skip "
                             "that file, listed with a warning)")


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto",
                        help: str = "where to compute (auto: CUDA when present)") -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default, help=help)


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints its whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m core", description="DefectPrune engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"core.commands.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name != f"core.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DefectPruneError, OSError) as exc:
        print(f"error: {disk_full_message(exc, 'the output folder', 'run the command again') or exc}",
              file=sys.stderr)
        return 2
    except Exception as exc:
        # a library's own error for a full disk (safetensors, numpy, pandas); anything else is a bug
        full = disk_full_message(exc, "the output folder", "run the command again")
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
