"""``python -m core ...``: every job the dashboard can start, from the command line.

Each command lives in ``core/commands/<name>.py`` with ``add_parser(subparsers)`` (which sets
``func``) so that commands are added without touching each other. A command that runs a
service builds its options from the service's request type (`add_request_arguments`) and
turns the parsed arguments into that request (`request_from_args`): the request holds the
checks, defaults and help, the command only prints. Errors a user can act on
(`DefectPruneError`) and file-system errors (`OSError`: a folder that cannot be written, a full
disk) print one line and exit 2; so do bad arguments (`OneLineParser`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from core.atomic import disk_full_message
from core.errors import DefectPruneError
from core.services import request as checks
from core.services.request import FLAG, LIST, OPTIONS, Check, ParameterError, Request, choices_of, default_of, flag_of

COMMAND_MODULES = ["data", "train", "evaluate", "import_model", "prune", "profile", "export_onnx", "jobs", "worker"]
R = TypeVar("R", bound=Request)


def argument_type(check: Check) -> Callable[[str], Any]:
    """An argparse type made of a request's `Check`: the same message on the command line as
    in a job's parameters."""

    def parse(text: str) -> Any:
        try:
            return check.parse(text)
        except ParameterError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


positive_int = argument_type(checks.POSITIVE_INT)
non_negative_float = argument_type(checks.NON_NEGATIVE_FLOAT)


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def add_request_arguments(parser: argparse.ArgumentParser, request_type: type[Request]) -> None:
    """One option per field of ``request_type`` that the command line has, with the field's
    check, choices, default and help."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in dataclasses.fields(request_type):
        meta = field.metadata
        if not meta.get("cli", True):
            continue
        target: Any = parser
        if meta.get("exclusive"):
            # not setdefault: its default is built every time, and an extra empty group breaks --help
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        help_text = meta.get("help") or None
        options: dict[str, Any] = {"help": help_text() if callable(help_text) else help_text}
        if meta.get("metavar"):
            options["metavar"] = meta["metavar"]
        kind = meta.get("kind")
        if kind == FLAG:
            target.add_argument(flag_of(field), action="store_true", **options)
            continue
        if kind == OPTIONS:
            target.add_argument(flag_of(field), action="append", default=[], **options)
            continue
        if meta.get("check") is not None:
            options["type"] = argument_type(meta["check"])
        if kind == LIST:
            target.add_argument(flag_of(field), nargs="+", default=[], **options)
            continue
        target.add_argument(flag_of(field), default=default_of(field), choices=choices_of(field),
                            required=bool(meta.get("required")), **options)


def add_request_command(sub: argparse._SubParsersAction, name: str, help: str, request_type: type[Request],
                        func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A command whose options are ``request_type``'s fields, and ``--json``, run by ``func``."""
    parser = sub.add_parser(name, help=help)
    add_request_arguments(parser, request_type)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=func)
    return parser


def request_from_args(request_type: type[R], args: argparse.Namespace, **fixed: Any) -> R:
    """The request the parsed arguments stand for; ``fixed`` sets the fields the command has
    no option for."""
    values: dict[str, Any] = dict(fixed)
    for field in dataclasses.fields(request_type):
        if not field.metadata.get("cli", True) or field.name in fixed:
            continue
        value = getattr(args, field.name)
        kind = field.metadata.get("kind")
        if kind == OPTIONS:
            value = checks.parse_options(value or [])
        elif kind == LIST:
            value = tuple(value or ())
        if value is not None:
            values[field.name] = value
    return request_type(**values)


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
        except ImportError as exc:  # a listed command that cannot be imported is a broken install or a typo
            raise ImportError(f"command module core.commands.{name} (listed in core.cli.COMMAND_MODULES) cannot "
                              f"be imported: {exc}") from exc
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
