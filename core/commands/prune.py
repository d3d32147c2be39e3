"""``python -m core prune --checkpoint DIR --method M --target-macs 0.8 --out DIR [...]``:
the iterative prune-retrain loop from the command line (`core.services.prune`). Dataset, root
and split seed default to the checkpoint's; the test split is evaluated once, on the result."""

from __future__ import annotations

import argparse
import sys

from core.cli import add_request_command, print_json, request_from_args
from core.services.prune import PruneRequest, run_prune


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_request_command(sub, "prune", "iterative prune-retrain of a checkpoint", PruneRequest, run)


class LoopBar:
    """tqdm view of the loop's (fraction, message) progress; the bar appears with the first
    report, so an error before the loop starts stays a single line."""

    def __init__(self):
        self.bar = None
        self.message = ""

    def __call__(self, fraction: float, message: str) -> bool:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1000, desc="prune", unit="‰", dynamic_ncols=True, file=sys.stderr)
        self.bar.update(int(fraction * 1000) - self.bar.n)
        if message != self.message:
            self.message = message
            self.bar.set_postfix_str(message, refresh=False)
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from core.train import distributed

    request = request_from_args(PruneRequest, args)
    bar = LoopBar()
    with distributed.launched(request.device):  # under torchrun: one rank of a data-parallel run
        if not distributed.is_main():  # rank 0 shows the progress and reports
            run_prune(request, progress=None)
            return 0
        try:
            result = run_prune(request, progress=bar)
            bar(1.0, f"stopped: {result.stopped}")  # a run stopped early (tolerance, user) ends short of it
        finally:
            bar.close()
    if args.json:
        payload = result.to_dict()
        print_json({"rounds": payload["rounds"], "result": payload["result"], "stopped": payload["stopped"],
                    "recovery": payload["recovery"]})
        return 0
    for r in result.rounds:
        status = "" if r.accepted else "  (beyond tolerance: reverted)"
        print(f"round {r.round}: MACs -{r.macs_reduction:.1%}, params -{r.params_reduction:.1%}, "
              f"val defect mIoU {r.defect_miou:.2f} (drop {r.drop:+.2f}){status}")
    if result.recovery:
        rec = result.recovery
        print(f"recovery: {rec['epochs']} epoch(s) on round {rec['from_round']} (lr {rec['lr']:g}, distillation "
              f"{rec['distill_weight']:g}, {rec['precision']}): val defect mIoU {rec['defect_miou']:.2f} "
              f"(drop {rec['drop']:+.2f})")
    res = result.result
    if res.get("test"):
        test = f"{res['test']['defect_miou']:.2f}"
    elif res.get("test_skipped"):
        test = "not run (stopped)"
    elif res["checkpoint"] is None:
        test = "not run (no round kept: the unpruned model is the result)"
    else:
        test = "not run (no test split)"
    print(f"result: {res['checkpoint']} MACs -{res['macs_reduction']:.1%} params -{res['params_reduction']:.1%} "
          f"val drop {res['drop']:.2f} test defect mIoU {test} ({result.stopped})")
    return 0
