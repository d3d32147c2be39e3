"""Every command's --help prints (argparse formats the usage only when asked, so a broken
option group shows nowhere else)."""

from __future__ import annotations

import argparse

import pytest

import core.cli
from core.cli import build_parser


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {prefix or "python -m core": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, f"{prefix} {name}".strip()))
    return found


def test_every_command_formats_its_help():
    parsers = commands(build_parser())
    assert {"prune", "train", "evaluate", "export-onnx"} <= set(parsers)
    for name, parser in parsers.items():
        assert "usage:" in parser.format_help(), name
        assert all(group._group_actions for group in parser._mutually_exclusive_groups), name


def test_the_two_targets_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--checkpoint", "x", "--target-macs", "0.5", "--target-params", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_every_listed_command_module_is_added():
    parsers = commands(build_parser())
    assert {name.replace("_", "-") for name in core.cli.COMMAND_MODULES} <= set(parsers)


def test_a_listed_command_module_that_cannot_be_imported_is_an_error(monkeypatch):
    """No command is skipped quietly: a name in COMMAND_MODULES without its module stops the parser."""
    monkeypatch.setattr(core.cli, "COMMAND_MODULES", [*core.cli.COMMAND_MODULES, "no_such_command"])
    with pytest.raises(ImportError, match=r"core\.commands\.no_such_command \(listed in core\.cli\.COMMAND_MODULES\)"):
        build_parser()
