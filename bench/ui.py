"""Time the Layer importance page's live answers for the default model against the dashboard's
limits: an allocation (allocator + closed-form MACs/params prediction) within 300 ms for every
allocator, and the live preview (a pruned copy at the setting, masks on 3 validation images)
in about 2 s.

    .venv/bin/python bench/ui.py [--checkpoint DIR] [--targets 20] [--preview-repeats 5]
        [--scoring-steps 30] [--calibration-images 16] [--threads 1]

The default model is Unet-resnet18 at 128 px on the default dataset (synthetic-steel). Without
--checkpoint the script reuses bench/cache/synthetic-steel-unet-resnet18-128-e20-s0 (from
bench/method_smoke.py) when it is there, else trains a 1-epoch baseline on 64 images into
bench/cache/ui/ (git-ignored). The measurements the page reads from score jobs (the scoring
network's logits, the sensitivity curves) are made once here with the page's own code
(reduced settings, cached in bench/cache/ui/): how fast a stored result turns into an
allocation does not depend on how long it was measured. The calls timed are the page's calls:
`core.live.live_allocation` + `CostModel.predict`, and `SegmentationDataset(limit=3)` +
`core.live.preview_pruned`. Writes bench/results/ui.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = REPO / "bench" / "cache"
os.environ.setdefault("DEFECTPRUNE_WORKSPACE", str(CACHE / "ui" / "workspace"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.allocation.baselines import allocate_by_sensitivity  # noqa: E402
from core.allocation.context import PruningContext, ScoringNetworkSettings, StepSettings  # noqa: E402
from core.allocation.cost import CostModel  # noqa: E402
from core.allocation.scoring_network import allocate_by_scoring_network  # noqa: E402
from core.data.dataset import SegmentationDataset  # noqa: E402
from core.data.registry import load_index  # noqa: E402
from core.live import group_l1_scores, live_allocation, preview_pruned  # noqa: E402
from core.importance.scoring import GroupAnalysis  # noqa: E402
from core.models.checkpoint import is_checkpoint, load_checkpoint  # noqa: E402
from core.models.graph import PruningGraph  # noqa: E402
from core.pruning.loop import calibration_batches  # noqa: E402
from core.train import class_pixel_counts, class_weights_from_counts  # noqa: E402

REUSED = CACHE / "synthetic-steel-unet-resnet18-128-e20-s0"
TRAINED = CACHE / "ui" / "synthetic-steel-unet-resnet18-128-e1-s0-l64"
ALLOCATION_LIMIT_MS = 300.0
PREVIEW_LIMIT_S = 2.0


def baseline(args: argparse.Namespace) -> Path:
    if args.checkpoint:
        return args.checkpoint
    if is_checkpoint(REUSED):
        return REUSED
    if not is_checkpoint(TRAINED):
        subprocess.run([sys.executable, "-m", "core", "train", "--format", "synthetic-steel", "--size", "128",
                        "--epochs", "1", "--limit", "64", "--batch-size", "8", "--seed", "0",
                        "--threads", str(args.threads), "--out", str(TRAINED), "--json"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return TRAINED


def stored_measurements(checkpoint: Path, loaded, graph, cost, args) -> tuple[dict, float, float]:
    """The scoring network's logits and the sensitivity curves, as a score job stores them
    (measured once, cached by checkpoint and settings); and the seconds each took."""
    key = f"{checkpoint.name}-{os.path.getmtime(checkpoint / 'weights.safetensors'):.0f}-s{args.scoring_steps}" \
          f"-c{args.calibration_images}"
    file = CACHE / "ui" / f"measurements-{key}.json"
    if file.is_file():
        stored = json.loads(file.read_text())
        stored["cached"] = str(file.relative_to(REPO))
        return stored, stored["scoring_seconds"], stored["sensitivity_seconds"]
    spec = loaded.spec
    index = load_index(spec.dataset_format, spec.dataset_root or None, seed=spec.split_seed)
    train = SegmentationDataset(index, "train", tuple(spec.input_size), spec.in_channels,
                                normalisation=spec.normalisation)
    batches = calibration_batches(train, args.calibration_images, 8, seed=0)
    weights = class_weights_from_counts(class_pixel_counts(train, len(spec.classes)))
    analysis = GroupAnalysis(scores=group_l1_scores(graph), correlations={})
    context = PruningContext(model=loaded.model, graph=graph, cost=cost, batches=batches,
                             class_names=list(spec.classes), class_weights=list(weights),
                             input_size=tuple(spec.input_size), in_channels=spec.in_channels,
                             settings=StepSettings(scoring=ScoringNetworkSettings(steps=args.scoring_steps)))
    start = time.perf_counter()
    scoring = allocate_by_scoring_network(context, analysis, 0.8)
    scoring_s = time.perf_counter() - start
    start = time.perf_counter()
    sensitivity = allocate_by_sensitivity(context, analysis, 0.8)
    sensitivity_s = time.perf_counter() - start
    stored = {"logits": scoring.details["logits"], "drops": sensitivity.details["drops"],
              "levels": sensitivity.details["levels"], "scoring_seconds": scoring_s,
              "sensitivity_seconds": sensitivity_s}
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(stored))
    return stored, scoring_s, sensitivity_s


def page_reruns_ms(checkpoint: Path, moves: list[float]) -> dict[str, list[float]]:
    """The whole server-side answer to a slider move: Streamlit reruns the Layer importance
    page script (AppTest, warm caches), for the allocators that need no score job."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    at.switch_page("pages/views/importance.py")
    at.session_state["model"] = str(checkpoint)
    at.run()  # the first visit loads the model and traces it; cached afterwards
    out: dict[str, list[float]] = {}
    for label in ("uniform", "global (L1)"):
        at.radio(key="importance_allocator").set_value(label).run()
        times = []
        for target in moves:
            at.slider(key="importance_target").set_value(target)
            start = time.perf_counter()
            at.run()
            times.append((time.perf_counter() - start) * 1000)
            if at.exception or at.error:
                raise RuntimeError(f"the page failed: {at.exception or [e.value for e in at.error]}")
        out[label] = times
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--targets", type=int, default=20, help="targets from 5% to 95% fewer MACs")
    parser.add_argument("--preview-repeats", type=int, default=5)
    parser.add_argument("--scoring-steps", type=int, default=30)
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ui.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()

    checkpoint = baseline(args)
    loaded = load_checkpoint(checkpoint)
    spec = loaded.spec
    start = time.perf_counter()
    graph = PruningGraph.traced(loaded.model, spec.input_size, spec.in_channels)
    cost = CostModel(graph)
    graph_s = time.perf_counter() - start
    start = time.perf_counter()
    l1 = group_l1_scores(graph)
    l1_s = time.perf_counter() - start
    stored, scoring_s, sensitivity_s = stored_measurements(checkpoint, loaded, graph, cost, args)
    inputs = {"uniform": {}, "global": {"l1_scores": l1}, "scoring-network": {"logits": stored["logits"]},
              "sensitivity": {"drops": stored["drops"], "levels": stored["levels"]}}

    # (a) the live allocation answer, as the page computes it on every slider move
    targets = [round(float(t), 4) for t in np.linspace(0.05, 0.95, args.targets)]
    allocation_rows, kept_at_80 = [], {}
    for name, extra in inputs.items():
        live_allocation(name, graph, cost, 0.5, **extra)  # warm-up (first-call overheads), not counted
        times, met, errors = [], 0, []
        for target in targets:
            start = time.perf_counter()
            live = live_allocation(name, graph, cost, target, **extra)
            predicted = cost.predict(dict(live.kept))
            times.append((time.perf_counter() - start) * 1000)
            met += bool(live.budget_met)
            if live.budget_met:
                errors.append(abs(predicted["macs_reduction"] - target))
        kept_at_80[name] = live_allocation(name, graph, cost, 0.8, **extra).kept
        allocation_rows.append({"allocator": name, "median_ms": statistics.median(times), "max_ms": max(times),
                                "met": met, "max_error": max(errors) if errors else None})

    # (b) the live preview: what the page does when "Preview this setting" is clicked
    index = load_index(spec.dataset_format, spec.dataset_root or None, seed=spec.split_seed)  # cached by the page
    preview_rows = []
    for name in ("uniform", "sensitivity"):
        times, inner = [], []
        for _ in range(args.preview_repeats):
            start = time.perf_counter()
            val = SegmentationDataset(index, "val", tuple(spec.input_size), spec.in_channels, limit=3,
                                      normalisation=spec.normalisation)
            preview = preview_pruned(loaded.model, spec.input_size, spec.in_channels, kept_at_80[name], val)
            times.append(time.perf_counter() - start)
            inner.append(preview.seconds)
        preview_rows.append({"allocator": name, "median_s": statistics.median(times), "max_s": max(times),
                             "prune_predict_median_s": statistics.median(inner), "images": len(preview.pictures) // 3})
    moves = [0.5, 0.55, 0.6, 0.3, 0.9, 0.75, 0.2, 0.65]
    reruns = page_reruns_ms(checkpoint, moves)
    load_after = os.getloadavg()

    command = "python bench/ui.py " + shlex.join(sys.argv[1:])
    lines = [
        "# Live tuning on the Layer importance page: answer times", "",
        f"Command: `{command}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (load average {load_before[0]:.1f} at the "
        f"start, {load_after[0]:.1f} at the end: above 1, other work shared the CPU), "
        f"{torch.get_num_threads()} torch thread, torch {torch.__version__}, "
        f"CPU only. Wall time {time.perf_counter() - started:.0f} s.", "",
        f"Model: {checkpoint.relative_to(REPO) if checkpoint.is_relative_to(REPO) else checkpoint} "
        f"({spec.arch}-{spec.encoder}, {spec.input_size[0]}x{spec.input_size[1]} px, {spec.in_channels} channel(s), "
        f"{spec.dataset_format}); {len(graph.groups)} prunable groups, {cost.macs0 / 1e6:.0f} M MACs.", "",
        "## (a) Allocation answer (limit 300 ms)", "",
        f"`live_allocation` + `CostModel.predict` for {len(targets)} targets from {targets[0]:.0%} to "
        f"{targets[-1]:.0%} fewer MACs, after one warm-up call; 'met' counts the targets whose budget the per-layer "
        "limits allow, 'max error' is the largest gap between the predicted and the asked MACs reduction among them.",
        "", "| allocator | median ms | max ms | within 300 ms | met | max error |", "|---|---|---|---|---|---|",
    ]
    slowest = max(allocation_rows, key=lambda r: r["max_ms"])
    preview_max = max(r["max_s"] for r in preview_rows)
    every = "every allocator answers" if slowest["max_ms"] <= ALLOCATION_LIMIT_MS else "NOT every allocator answers"
    verdict = (f"Verdict: {every} within 300 ms (slowest: {slowest['allocator']}, max {slowest['max_ms']:.0f} ms); "
               f"the preview {'is' if preview_max <= PREVIEW_LIMIT_S else 'is NOT'} within about 2 s "
               f"(max {preview_max:.2f} s).")
    at = lines.index("## (a) Allocation answer (limit 300 ms)")
    lines[at:at] = [verdict, ""]
    for r in allocation_rows:
        ok = "yes" if r["max_ms"] <= ALLOCATION_LIMIT_MS else "no"
        error = "n/a" if r["max_error"] is None else f"{r['max_error']:.2%}"
        lines.append(f"| {r['allocator']} | {r['median_ms']:.1f} | {r['max_ms']:.1f} | {ok} | "
                     f"{r['met']}/{len(targets)} | {error} |")
    lines += [
        "", "Paid once per model, not per slider move (the page caches them): tracing the pruning graph and "
        f"building the cost model {graph_s:.1f} s; the group L1 scores for 'global' {l1_s:.2f} s.",
        f"Measured once in a background score job (here with {args.calibration_images} calibration images and "
        f"{args.scoring_steps} scoring-network steps; the page's job uses 64 images and 300 steps, so several times "
        f"longer): the scoring network {scoring_s:.0f} s, the sensitivity curves {sensitivity_s:.0f} s"
        + (f" (measured by an earlier run of this script; this run read them from {stored['cached']})"
           if stored.get("cached") else "") + ".", "",
        f"The whole server-side answer to a slider move (Streamlit reruns the page script: sidebar, store "
        f"queries, allocation, overrides table, metrics, charts; AppTest, warm caches, {len(moves)} moves; the "
        "browser's drawing not counted): " + "; ".join(
            f"{label} median {statistics.median(t):.0f} ms, max {max(t):.0f} ms" for label, t in reruns.items())
        + ".", "",
        "## (b) Live preview (limit about 2 s)", "",
        f"`SegmentationDataset(limit=3)` + `preview_pruned` at the allocation for 80% fewer MACs, "
        f"{args.preview_repeats} repeats: a pruned copy (deep copy, graph trace, cut) and both models' masks on "
        "3 validation images. The dataset index is cached by the page and not counted.", "",
        "| allocation | median s | max s | within 2 s | of which prune + predict (median s) |",
        "|---|---|---|---|---|",
    ]
    for r in preview_rows:
        ok = "yes" if r["max_s"] <= PREVIEW_LIMIT_S else "no"
        lines.append(f"| {r['allocator']} at 80% | {r['median_s']:.2f} | {r['max_s']:.2f} | {ok} | "
                     f"{r['prune_predict_median_s']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(json.dumps({"written": str(args.out), "allocation": allocation_rows, "preview": preview_rows,
                      "page_reruns_ms": reruns}))


if __name__ == "__main__":
    main()
