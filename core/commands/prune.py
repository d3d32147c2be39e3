"""``python -m core prune --checkpoint DIR --method M --target-macs 0.8 --out DIR [...]``:
the iterative prune-retrain loop from the command line. Dataset, root and split seed default
to the checkpoint's; the test split is evaluated once, on the result."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from core.cli import (
    finite_float, non_negative_finite, seed_int,
    add_device_argument, add_precision_argument, fraction, non_negative_int, positive_float, positive_int, print_json,
    unit_interval,
)
from core.commands.evaluate import index_for_checkpoint
from core.commands.train import add_data_arguments, dataset_options
from core.data.base import parse_size
from core.data.dataset import SegmentationDataset
from core.allocation.base import AllocationLimits
from core.allocation.baselines import ALLOCATORS
from core.allocation.scoring_network import ScoringNetworkSettings
from core.importance.criteria import CRITERIA
from core.importance.substitutability import CORRELATION_SOURCES
from core.pruning.methods import METHODS
from core.train import TorchThreads, TrainConfig, resolve_device

if TYPE_CHECKING:
    from core.pruning.loop import LoopProgress, LoopResult, LoopSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prune", help="iterative prune-retrain of a checkpoint")
    parser.add_argument("--checkpoint", required=True, help="the trained (unpruned or pruned) checkpoint")
    add_data_arguments(parser, required=False)
    parser.add_argument("--split-seed", type=seed_int, default=None, help="split seed (default: the checkpoint's)")
    parser.add_argument("--method", default="collaborative", choices=list(METHODS))
    parser.add_argument("--allocator", default=None, choices=ALLOCATORS, help="ablation: override the allocator")
    parser.add_argument("--criterion", default=None, choices=CRITERIA, help="ablation: override the criterion")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-macs", type=fraction, default=None, help="MACs reduction to reach (0.8)")
    target.add_argument("--target-params", type=fraction, default=None, help="parameter reduction to reach")
    parser.add_argument("--tolerance", type=non_negative_finite, default=1.0, help="largest defect-mIoU drop, in points")
    parser.add_argument("--no-tolerance-stop", action="store_true",
                        help="keep going past the tolerance (trace the whole frontier)")
    parser.add_argument("--step", type=fraction, default=0.3, help="share of the remaining MACs removed per round")
    parser.add_argument("--milestones", type=fraction, nargs="+", default=[], metavar="REDUCTION",
                        help="MACs reductions a round lands on exactly on its way to the target (0.5 0.7)")
    parser.add_argument("--finetune-epochs", type=non_negative_int, default=2)
    parser.add_argument("--max-rounds", type=positive_int, default=10)
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--recover-epochs", type=non_negative_int, default=0,
                        help="final recovery phase: fine-tune the last accepted round this many more epochs "
                             "(warm-up + cosine); its checkpoint becomes the result (0: none)")
    parser.add_argument("--recover-lr", type=positive_float, default=None,
                        help="learning rate of the recovery phase (default: --lr)")
    parser.add_argument("--distill-weight", type=unit_interval, default=0.0,
                        help="distil every fine-tune from the run's starting model: loss = (1 - a) x supervised "
                             "+ a x T^2 x KL (0: off)")
    parser.add_argument("--distill-temperature", type=positive_float, default=2.0, help="distillation temperature T")
    parser.add_argument("--recover-distill-weight", type=unit_interval, default=None,
                        help="distillation weight of the recovery phase (default: --distill-weight)")
    parser.add_argument("--beta", type=finite_float, default=0.5, help="weight of substitutability in the score")
    parser.add_argument("--correlation", default="activations", choices=list(CORRELATION_SOURCES),
                        help="substitutability from the channels' responses on calibration images (default) "
                             "or, without data, from the cosine of the filters' weights")
    parser.add_argument("--scoring-steps", type=positive_int, default=300, help="scoring-network steps per round")
    parser.add_argument("--calibration-images", type=positive_int, default=64)
    parser.add_argument("--max-prune-ratio", type=fraction, default=0.9, help="largest share cut from one layer")
    parser.add_argument("--round-to", type=positive_int, default=1, help="keep channel counts multiples of this")
    parser.add_argument("--cut-head-input", action="store_true",
                        help="let allocators cut the layer the classifier reads (kept whole by default)")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--out", required=True, help="folder for the rounds' checkpoints and rounds.json")
    add_device_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


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


def loop_settings_from_args(args: argparse.Namespace, device: str) -> LoopSettings:
    """The loop's settings from ``prune``'s arguments (also the run store's prune job's)."""
    from core.pruning.loop import LoopSettings
    from core.pruning.step import StepSettings

    kind, target = ("params", args.target_params) if args.target_params else ("macs", args.target_macs or 0.8)
    return LoopSettings(
        method=args.method, allocator=args.allocator, criterion=args.criterion, target=target,
        target_kind=kind, tolerance=args.tolerance, step=args.step, milestones=tuple(args.milestones),
        finetune_epochs=args.finetune_epochs, recover_epochs=args.recover_epochs, recover_lr=args.recover_lr,
        recover_distill_weight=args.recover_distill_weight,
        max_rounds=args.max_rounds, stop_at_tolerance=not args.no_tolerance_stop,
        calibration_images=args.calibration_images, seed=args.seed,
        step_settings=StepSettings(
            beta=args.beta, correlation=args.correlation, seed=args.seed, scoring=ScoringNetworkSettings(steps=args.scoring_steps, seed=args.seed),
            limits=AllocationLimits(max_prune_ratio=args.max_prune_ratio, round_to=args.round_to,
                                   protect_head_input=not args.cut_head_input)),
        finetune=TrainConfig(epochs=max(args.finetune_epochs, 1), batch_size=args.batch_size, lr=args.lr,
                             patience=None, seed=args.seed, num_threads=args.threads, device=str(device),
                             num_workers=args.workers, precision=args.precision,
                             distill_weight=args.distill_weight, distill_temperature=args.distill_temperature),
    )


def prune_from_args(args: argparse.Namespace, progress: LoopProgress | None = None) -> LoopResult:
    """Everything ``prune`` does except printing: shared with the run store's prune job.
    Run again on the same ``--out`` it resumes after the last finished round."""
    from core.models.checkpoint import load_checkpoint
    from core.pruning.loop import run_prune_loop

    from core.atomic import check_output_folder
    from core.models.checkpoint import read_spec
    from core.pruning.loop import is_prune_run

    # before anything is loaded: a dataset folder or the source checkpoint is never an output,
    # nor a folder holding something other than an earlier run of this kind (resumed)
    dataset_root = args.root if args.root is not None else read_spec(args.checkpoint).dataset_root
    check_output_folder(args.out, "prune run (rounds.json and its rounds)", is_prune_run,
                        protected=[("the checkpoint", args.checkpoint), ("the dataset folder", dataset_root)])
    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, device=device)
    spec = loaded.spec
    index, same_format = index_for_checkpoint(args.checkpoint, spec, args.format, args.root, args.split_seed,
                                              dataset_options(args), strict=getattr(args, "strict", False))
    size = parse_size(args.size, tuple(spec.input_size) if same_format else index.default_size)
    spec.input_size = size
    datasets = {
        split: SegmentationDataset(index, split, size, spec.in_channels, augment=split == "train",
                                   seed=args.seed, limit=args.limit)
        for split in ("train", "val", "test")
    }
    settings = loop_settings_from_args(args, str(device))
    with TorchThreads(args.threads):
        return run_prune_loop(loaded.model, spec, list(loaded.history), datasets["train"], datasets["val"],
                              datasets["test"], args.out, settings, progress=progress)


def run(args: argparse.Namespace) -> int:
    bar = LoopBar()
    try:
        result = prune_from_args(args, progress=bar)
        bar(1.0, f"stopped: {result.stopped}")  # rounds are budgeted for the round limit; fewer may do
    finally:
        bar.close()
    payload = result.to_dict()
    if args.json:
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
