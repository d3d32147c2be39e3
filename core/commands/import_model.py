"""``python -m core import-model --source PATH [--arch A --encoder E --classes NAMES] [--format F
--root DIR] [--size S] [--mean ... --std ...] --out DIR [--json]``: a model trained elsewhere
(an smp ``save_pretrained`` folder or a state dict) as a checkpoint, evaluated at once on the
dataset's val split (`core.services.import_model`)."""

from __future__ import annotations

import argparse

from core.cli import add_request_command, print_json, request_from_args
from core.commands.train import format_metrics
from core.services.import_model import ImportRequest, run_import


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_request_command(sub, "import-model", "import a model trained elsewhere (smp folder or state dict) as a "
                        "checkpoint and evaluate it", ImportRequest, run)


def run(args: argparse.Namespace) -> int:
    from core.train import ProgressBar

    request = request_from_args(ImportRequest, args)
    with ProgressBar(f"import {request.source}") as bar:
        result = run_import(request, progress=bar)
    if args.json:
        print_json(result.to_json())
        return 0
    norm = result.normalisation
    print(f"saved {result.checkpoint}: {result.arch}-{result.encoder} from the {result.source_kind} {result.source} "
          f"({result.tensors} tensors), {result.in_channels} channel(s) at {result.input_size[0]}x"
          f"{result.input_size[1]}, classes {', '.join(result.classes)}, mean {norm['mean']} std {norm['std']}")
    for note in result.notes:
        print(f"note: {note}")
    if result.evaluation is None:
        print("not evaluated: no dataset given (--format, --root)")
    else:
        report = result.evaluation
        print(format_metrics(f"{report['split']} ({report['images']} images)", report))
    return 0
