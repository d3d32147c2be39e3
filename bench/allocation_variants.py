"""Diagnose the scoring network on NEU-Seg: one shot to 80% fewer MACs (L1 within groups, 2
fine-tune epochs, the METHOD.md part 2 setting) with one setting of the scoring network changed.

    .venv/bin/python bench/allocation_variants.py NAME --checkpoint DIR [--steps 300] [--pressure 0.3]
        [--lr 0.1] [--max-prune-ratio 0.9] [--allocator scoring-network] [--no-protect-head-input]
        [--threads 1]

Prints one JSON line: validation defect mIoU, reductions, keep ratio per scale and channels kept
per group. ``--no-protect-head-input`` lets allocators cut the groups the classifier conv reads
(the product keeps them whole since the finding of session 2: the scoring network starved the
classifier). Outputs go
to bench/cache/method_smoke/variant-NAME (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.method_smoke import SHARED, datasets, loop_settings  # noqa: E402
from core.allocation.base import AllocationLimits  # noqa: E402
from core.allocation.context import ScoringNetworkSettings, StepSettings  # noqa: E402
from core.models.checkpoint import load_checkpoint  # noqa: E402
from core.pruning.loop import LoopInputs, run_prune_loop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a trained NEU-Seg baseline")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pressure", type=float, default=ScoringNetworkSettings.pressure)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--max-prune-ratio", type=float, default=0.9)
    parser.add_argument("--no-protect-head-input", dest="protect_head_input", action="store_false")
    parser.add_argument("--allocator", default="scoring-network", choices=["scoring-network", "uniform", "global"])
    parser.add_argument("--train-limit", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint)
    train, val, _test = datasets("neu-seg", str(SHARED / "neu-seg"), loaded.spec.input_size, loaded.spec.in_channels,
                                 loaded.spec.split_seed, args.train_limit)
    settings = loop_settings(argparse.Namespace(finetune_epochs=2, seed=0, scoring_steps=args.steps,
                                                threads=args.threads),
                             method="collaborative", allocator=args.allocator, criterion="l1", step=0.8,
                             max_rounds=1, finetune_epochs=2)
    settings.step_settings = StepSettings(
        seed=0, scoring=ScoringNetworkSettings(steps=args.steps, pressure=args.pressure, lr=args.lr),
        limits=AllocationLimits(max_prune_ratio=args.max_prune_ratio, protect_head_input=args.protect_head_input))
    start = time.perf_counter()
    result = run_prune_loop(LoopInputs(loaded.model, loaded.spec, list(loaded.history), train, val),
                            REPO / "bench" / "cache" / "method_smoke" / f"variant-{args.name}", settings)
    r = result.rounds[0]
    print(json.dumps({"name": args.name, **{k: v for k, v in vars(args).items() if k != "checkpoint"},
                      "val_defect_miou": r.defect_miou, "macs_reduction": r.macs_reduction,
                      "params_reduction": r.params_reduction, "wall_s": time.perf_counter() - start,
                      "scale_keep": r.step["allocation"]["scale_importance"],
                      "kept": r.step["allocation"]["kept"]}))


if __name__ == "__main__":
    main()
