"""Latency benchmark: does cutting MACs cut CPU latency? The unpruned and pruned default model
(Unet-resnet18) at batch 1, timed with PyTorch and ONNX Runtime at several input sizes and
thread counts, median of 30 timed runs after warm-up.

    .venv/bin/python bench/latency.py [--sizes 128 256] [--threads 1 2] [--runs 30] [--warmup 5]
        [--targets 0.5 0.8 0.9] [--allocators uniform scoring-network] [--round-to 1 8 16]
        [--scoring-steps 30] [--checkpoint DIR ...] [--quick] [--out bench/results/latency.md]

By default a fresh copy of the default model (random weights: accuracy is not the point,
cost is) is pruned in-process by the engine to each MACs-reduction target, for each allocator
and each channel rounding (`AllocationLimits(round_to=...)`: kept counts as multiples of 1, 8
or 16, widths vector units and GEMM kernels like). The scoring network (the method's
allocator) needs data: without a trained model and dataset it is trained for a few steps on
seeded random calibration batches, so its allocation shows the shapes the method produces,
not the ones it would pick on a real dataset. Which filters go does not change cost, so every
pruned copy keeps the group-L1 largest filters (`core.pruning.step.pruned_copy`).

The latency table (`core.allocation.latency`: each conv timed alone over a grid of kept
channel counts on this machine, interpolated) is built on the unpruned model for every engine,
thread count and size, and its prediction for each pruned copy is set beside the measured
median: the table's prediction error (goal, reported: within 10%). `--no-table` skips it.

With `--frontier` a small accuracy experiment follows: a baseline trained briefly on the
synthetic steel set (`--frontier-size`, `--frontier-images`, `--frontier-epochs`), then pruned
in one round by the scoring network to `--frontier-macs` fewer MACs (the MACs-targeted run) and
to each of `--frontier-latency` latency reductions on the table (`--cost latency`), each
fine-tuned `--frontier-finetune` epochs; all of them timed in turns. Reported: the fastest
latency-targeted model whose validation defect mIoU is within `--equal-accuracy` points of the
MACs-targeted one's, and how much faster it is (goal, reported: at least 15%).

With `--checkpoint DIR` (repeatable) the given checkpoints are timed instead (for example the
rounds of bench/compression.py's runs, bench/cache/compression/<setting>/<method>/round_NN),
each against a fresh unpruned model of its own architecture.

Reported per model: MACs and parameter reduction, latency per engine, thread count and size,
the latency gain (1 - pruned / unpruned latency) and that gain divided by the MACs reduction
(the issue's goal: at least 0.8 at 256 px on the CPU). Writes a Markdown report with the
exact command, the machine and the date. `--quick` is a smoke run (64 px, few runs) written
to bench/cache/ unless `--out` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from core.allocation.base import AllocationLimits  # noqa: E402
from core.allocation.context import PruningContext, ScoringNetworkSettings, StepSettings  # noqa: E402
from core.allocation.cost import CostModel  # noqa: E402
from core.allocation.scoring_network import allocate_by_scoring_network  # noqa: E402
from core.importance.scoring import GroupAnalysis  # noqa: E402
from core.live import group_l1_scores, live_allocation  # noqa: E402
from core.models.graph import PruningGraph  # noqa: E402
from core.models.zoo import ModelSpec, build_model  # noqa: E402
from core.profile import (  # noqa: E402
    count_macs, count_params, export_onnx, measure_latency, measure_onnx_latency,
)
from core.pruning.step import pruned_copy  # noqa: E402

ENGINES = ("torch", "onnxruntime")
ENGINE_LABEL = {"torch": "torch", "onnxruntime": "ORT"}
ALLOCATOR_CHOICES = ("uniform", "scoring-network")
GOAL_RATIO = 0.8  # latency gain / MACs gain the issue asks for at 256 px
GOAL_SIZE = 256
NOISY_DRIFT = 0.10  # the reference's latency moving more than this during a run marks it noisy
DEFAULT_CLASSES = ["background", "inclusion", "patches", "scratches"]  # NEU-Seg's, grayscale
QUICK_OUT = REPO / "bench" / "cache" / "latency-quick.md"


@dataclass
class Timed:
    """One model's costs and timings. ``latency`` is keyed by (engine, threads, size)."""

    label: str
    allocator: str  # "none" for the unpruned reference, "checkpoint" for a given one
    round_to: int | None
    target: float | None
    params: int
    macs: dict[int, int]  # per input size
    latency: dict[tuple[str, int, int], float] = field(default_factory=dict)  # median ms
    spread: dict[tuple[str, int, int], float] = field(default_factory=dict)  # (p90 - p10) / median
    budget_met: bool | None = None  # None: not pruned here (the unpruned model, a checkpoint)
    reference: "Timed | None" = None  # the unpruned model it is compared with
    # the unpruned model timed again after every other model: how far the machine drifted
    retimed: dict[tuple[str, int, int], float] = field(default_factory=dict)
    # the latency table's prediction (ms), keyed as ``latency``
    predicted: dict[tuple[str, int, int], float] = field(default_factory=dict)

    def prediction_error(self, key: tuple[str, int, int]) -> float | None:
        """(predicted - measured) / measured, or None without both."""
        if key not in self.predicted or not self.latency.get(key):
            return None
        return self.predicted[key] / self.latency[key] - 1.0

    def macs_reduction(self, size: int) -> float:
        if self.reference is None:
            return 0.0
        return 1.0 - self.macs[size] / self.reference.macs[size]

    @property
    def params_reduction(self) -> float:
        return 0.0 if self.reference is None else 1.0 - self.params / self.reference.params

    def latency_gain(self, key: tuple[str, int, int]) -> float | None:
        if self.reference is None or key not in self.latency or key not in self.reference.latency:
            return None
        return 1.0 - self.latency[key] / self.reference.latency[key]

    def gain_ratio(self, key: tuple[str, int, int]) -> float | None:
        """Latency gain divided by MACs gain (1.0: latency falls exactly as MACs do)."""
        gain, macs = self.latency_gain(key), self.macs_reduction(key[2])
        if gain is None or macs <= 1e-9:
            return None
        return gain / macs


# ------------------------------------------------------------------ models to time
def default_spec(args: argparse.Namespace) -> ModelSpec:
    size = min(args.sizes)
    return ModelSpec(classes=list(args.classes), arch=args.arch, encoder=args.encoder,
                     in_channels=args.in_channels, input_size=(size, size))


def random_calibration(spec: ModelSpec, count: int, batch: int, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded noise images with random rectangles of every defect class as masks: enough for
    the scoring network to run (its losses are meaningless on random weights anyway)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, spec.in_channels, size, size, generator=generator)
    masks = torch.zeros(count, size, size, dtype=torch.long)
    for i in range(count):
        for c in range(1, spec.num_classes):
            h, w = (int(v) for v in torch.randint(size // 8, size // 3, (2,), generator=generator))
            top, left = (int(v) for v in torch.randint(0, size - max(h, w), (2,), generator=generator))
            masks[i, top:top + h, left:left + w] = c
    return [(images[i:i + batch], masks[i:i + batch]) for i in range(0, count, batch)]


def trained_logits(model: nn.Module, graph: PruningGraph, cost: CostModel, spec: ModelSpec,
                   args: argparse.Namespace) -> list[float]:
    """The scoring network's per-group logits after a few steps on random calibration batches
    (the budget is met afterwards per target, so one training serves every target)."""
    batches = random_calibration(spec, args.calibration_images, 4, args.calibration_size, args.seed)
    settings = StepSettings(scoring=ScoringNetworkSettings(steps=args.scoring_steps, seed=args.seed),
                            limits=AllocationLimits())
    context = PruningContext(model=model, graph=graph, cost=cost, batches=batches, class_names=list(spec.classes),
                             class_weights=[1.0] * spec.num_classes, input_size=tuple(spec.input_size),
                             in_channels=spec.in_channels, settings=settings)
    analysis = GroupAnalysis(scores=group_l1_scores(graph), correlations={})
    allocation = allocate_by_scoring_network(context, analysis, max(args.targets))
    return list(allocation.details["logits"])


def engine_models(args: argparse.Namespace) -> Iterator[tuple[dict, nn.Module, ModelSpec]]:
    """The unpruned default model first, then one pruned copy per allocator x rounding x target."""
    torch.manual_seed(args.seed)
    spec = default_spec(args)
    model = build_model(spec).eval()
    yield {"label": "unpruned", "allocator": "none", "round_to": None, "target": None}, model, spec
    graph = PruningGraph.traced(model, spec.input_size, spec.in_channels)
    cost = CostModel(graph)
    logits = None
    if "scoring-network" in args.allocators:
        start = time.perf_counter()
        logits = trained_logits(model, graph, cost, spec, args)
        print(f"scoring network: {args.scoring_steps} steps on random batches in {time.perf_counter() - start:.0f} s",
              flush=True)
    for allocator in args.allocators:
        for round_to in args.round_to:
            for target in sorted(args.targets):
                allocation = live_allocation(allocator, graph, cost, target, logits=logits,
                                             limits=AllocationLimits(round_to=round_to))
                pruned = pruned_copy(model, spec.input_size, spec.in_channels, allocation.kept).eval()
                label = f"{allocator} r{round_to} {target:.0%}"
                yield ({"label": label, "allocator": allocator, "round_to": round_to, "target": target,
                        "budget_met": allocation.budget_met, "kept": dict(allocation.kept)}, pruned, spec)


def checkpoint_models(args: argparse.Namespace) -> Iterator[tuple[dict, nn.Module, ModelSpec]]:
    """Each checkpoint, preceded by a fresh unpruned model of its architecture when that
    architecture has not been seen yet."""
    from core.models.checkpoint import load_checkpoint

    seen = set()
    for path in args.checkpoint:
        loaded = load_checkpoint(path)
        spec = loaded.spec
        key = (spec.arch, spec.encoder, spec.in_channels, spec.num_classes)
        if key not in seen:
            seen.add(key)
            torch.manual_seed(args.seed)
            yield ({"label": f"unpruned {spec.arch}-{spec.encoder}", "allocator": "none", "round_to": None,
                    "target": None, "key": key}, build_model(spec).eval(), spec)
        label = "/".join(Path(path).resolve().parts[-2:])
        yield ({"label": label, "allocator": "checkpoint", "round_to": None, "target": None, "key": key},
               loaded.model.eval(), spec)


# ------------------------------------------------------------------ timing
def time_model(meta: dict, model: nn.Module, spec: ModelSpec, args: argparse.Namespace) -> Timed:
    sizes = sorted(args.sizes)
    timed = Timed(label=meta["label"], allocator=meta["allocator"], round_to=meta.get("round_to"),
                  target=meta.get("target"), params=count_params(model),
                  macs={s: count_macs(model, (s, s), spec.in_channels) for s in sizes},
                  budget_met=meta.get("budget_met"))
    with tempfile.TemporaryDirectory(prefix="defectprune-latency-") as folder:
        for size in sizes:
            for engine in args.engines:
                onnx_path = None
                if engine == "onnxruntime":
                    onnx_path = export_onnx(model, Path(folder) / f"model-{size}.onnx", (size, size), spec.in_channels)
                for threads in args.threads:
                    if engine == "torch":
                        result = measure_latency(model, (size, size), spec.in_channels, runs=args.runs,
                                                 warmup=args.warmup, threads=threads)
                    else:
                        result = measure_onnx_latency(onnx_path, (size, size), spec.in_channels, runs=args.runs,
                                                      warmup=args.warmup, threads=threads)
                    key = (engine, threads, size)
                    timed.latency[key] = result.median_ms
                    timed.spread[key] = (result.p90_ms - result.p10_ms) / result.median_ms if result.median_ms else 0.0
    return timed


def table_settings(args: argparse.Namespace, engine: str, threads: int):
    from core.allocation.latency import LatencySettings

    return LatencySettings(engine=engine, threads=threads, grid=args.table_grid, repeats=args.table_repeats,
                           folder=str(args.table_folder))


def build_latency_tables(model: nn.Module, spec: ModelSpec, args: argparse.Namespace) -> dict:
    """The unpruned model's latency cost model per (engine, threads, size), measured where this
    machine's cached table lacks it."""
    from core.allocation.latency import latency_cost_model

    costs = {}
    for size in sorted(args.sizes):
        graph = PruningGraph.traced(model, (size, size), spec.in_channels)
        for engine in args.engines:
            for threads in args.threads:
                start = time.perf_counter()
                costs[(engine, threads, size)] = cost = latency_cost_model(
                    graph, table_settings(args, engine, threads))
                print(f"latency table {ENGINE_LABEL[engine]} {threads}t {size}px: predicts {cost.latency0:.1f} ms "
                      f"unpruned (convs {cost.conv_ms0:.1f} ms, rest {cost.rest_ms:.1f} ms) in "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    return costs


def run(args: argparse.Namespace) -> list[Timed]:
    models = checkpoint_models(args) if args.checkpoint else engine_models(args)
    rows: list[Timed] = []
    references: dict = {}
    unpruned: dict = {}
    tables: dict = {}
    for meta, model, spec in models:
        start = time.perf_counter()
        if args.table and not args.checkpoint and meta["allocator"] == "none":
            tables = build_latency_tables(model, spec, args)
        timed = time_model(meta, model, spec, args)
        if tables and meta["allocator"] != "none" and meta.get("kept"):
            timed.predicted = {key: cost.predict(meta["kept"])["latency_ms"] for key, cost in tables.items()}
        elif tables and meta["allocator"] == "none":
            timed.predicted = {key: cost.latency0 for key, cost in tables.items()}
        key = meta.get("key", "default")
        if meta["allocator"] == "none":
            references[key] = timed
            unpruned[key] = (meta, model, spec)
        else:
            timed.reference = references[key]
        rows.append(timed)
        size = max(args.sizes)
        print(f"{timed.label}: MACs -{timed.macs_reduction(size):.1%}, params -{timed.params_reduction:.1%}, "
              + ", ".join(f"{ENGINE_LABEL[e]} {t}t {s}px {ms:.1f} ms" for (e, t, s), ms in timed.latency.items()
                          if s == size)
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
        del model
    for key, (meta, model, spec) in unpruned.items():
        references[key].retimed = time_model(meta, model, spec, args).latency
    return rows


# ------------------------------------------------------------------ report
def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ratio_cell(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"**{x:.2f}**" if x >= GOAL_RATIO else f"{x:.2f}"


def keys_for(args: argparse.Namespace, size: int) -> list[tuple[str, int, int]]:
    return [(e, t, size) for e in args.engines for t in sorted(args.threads)]


def key_label(key: tuple[str, int, int]) -> str:
    engine, threads, _ = key
    return f"{ENGINE_LABEL[engine]} {threads}t"


def models_table(rows: list[Timed], args: argparse.Namespace) -> list[str]:
    size = min(args.sizes)
    lines = ["## Models", "",
             f"| model | allocator | round to | target | MACs red. | params red. | GMACs @{size} px | params M | budget met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.allocator} | {r.round_to or '-'} | {pct(r.target) if r.target else '-'} | "
                     f"{pct(r.macs_reduction(size))} | {pct(r.params_reduction)} | {r.macs[size] / 1e9:.3f} | "
                     f"{r.params / 1e6:.2f} | {'-' if r.budget_met is None else 'yes' if r.budget_met else 'no'} |")
    return lines + [""]


def latency_tables(rows: list[Timed], args: argparse.Namespace, size: int) -> list[str]:
    keys = keys_for(args, size)
    head = " | ".join(key_label(k) for k in keys)
    lines = [f"## {size} px", "",
             "Median ms at batch 1 (latency gain against the unpruned model):", "",
             f"| model | MACs red. | {head} |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            gain = r.latency_gain(k)
            cells.append(f"{r.latency[k]:.1f}" + (f" ({pct(gain)})" if gain is not None else ""))
        lines.append(f"| {r.label} | {pct(r.macs_reduction(size))} | " + " | ".join(cells) + " |")
    lines += ["", f"Latency gain / MACs gain (bold: at least {GOAL_RATIO}):", "",
              f"| model | MACs red. | {head} |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        if r.reference is None:
            continue
        lines.append(f"| {r.label} | {pct(r.macs_reduction(size))} | "
                     + " | ".join(ratio_cell(r.gain_ratio(k)) for k in keys) + " |")
    return lines + [""]


def rounding_table(rows: list[Timed], args: argparse.Namespace, size: int) -> list[str]:
    """Per allocator and target, the gain ratio at each rounding side by side."""
    roundings = sorted({r.round_to for r in rows if r.round_to})
    if len(roundings) < 2:
        return []
    keys = keys_for(args, size)
    at = {(r.allocator, r.round_to, r.target): r for r in rows if r.round_to}
    lines = [f"## Does rounding help? ({size} px)", "",
             "Latency gain / MACs gain per channel rounding (" + " / ".join(f"r{x}" for x in roundings)
             + "); the MACs reduction reached differs a little between roundings, the ratio normalises it.", "",
             "| allocator | target | " + " | ".join(key_label(k) for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    better = {x: 0 for x in roundings[1:]}
    compared = 0
    for allocator in dict.fromkeys(r.allocator for r in rows if r.round_to):
        for target in sorted({r.target for r in rows if r.round_to}):
            cells = []
            for k in keys:
                values = [at[(allocator, x, target)].gain_ratio(k) if (allocator, x, target) in at else None
                          for x in roundings]
                cells.append(" / ".join("n/a" if v is None else f"{v:.2f}" for v in values))
                if values[0] is not None:
                    compared += 1
                    for x, v in zip(roundings[1:], values[1:]):
                        better[x] += v is not None and v > values[0]
            lines.append(f"| {allocator} | {pct(target)} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- r{x} gives a higher ratio than r{roundings[0]} in {better[x]} of {compared} "
                     "allocator x target x engine x threads cells." for x in better] + [""]
    return lines


def goal_lines(rows: list[Timed], args: argparse.Namespace) -> list[str]:
    size = GOAL_SIZE if GOAL_SIZE in args.sizes else max(args.sizes)
    keys = keys_for(args, size)
    pruned = [r for r in rows if r.reference is not None]
    if not pruned:
        return []
    lines = [f"## Goal: latency gain at least {GOAL_RATIO} of the MACs gain at {size} px", ""]
    for k in keys:
        ratios = [(r, r.gain_ratio(k)) for r in pruned if r.gain_ratio(k) is not None]
        met = [r.label for r, v in ratios if v >= GOAL_RATIO]
        worst = min(ratios, key=lambda rv: rv[1]) if ratios else None
        lines.append(f"- {key_label(k)}: met by {len(met)} of {len(ratios)} pruned models"
                     + (f"; lowest {worst[1]:.2f} ({worst[0].label})" if worst else "") + ".")
    return lines + [""]


def drift_lines(rows: list[Timed], args: argparse.Namespace) -> list[str]:
    """The unpruned model's medians at the start against the end of the run: gains smaller than
    this drift are within the machine's noise."""
    lines = []
    for r in rows:
        if not r.retimed:
            continue
        drifts = {k: r.retimed[k] / r.latency[k] - 1.0 for k in r.latency if k in r.retimed and r.latency[k] > 0}
        if not drifts:
            continue
        worst = max(drifts, key=lambda k: abs(drifts[k]))
        lines.append(f"Drift: {r.label} timed again after every other model: largest change "
                     f"{drifts[worst]:+.1%} ({key_label(worst)}, {worst[2]} px: {r.latency[worst]:.1f} -> "
                     f"{r.retimed[worst]:.1f} ms); gains are against the first timing.")
        if abs(drifts[worst]) > NOISY_DRIFT:
            lines += ["", f"**Noisy run: the unpruned model's latency moved by more than {NOISY_DRIFT:.0%} during "
                      "the run (other work on the machine); do not read gains from it. Rerun on a quiet machine.**"]
    return lines + ([""] if lines else [])


def machine_line(args: argparse.Namespace, load_start: tuple, load_end: tuple, wall: float) -> str:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"Machine: {cpu}, {os.cpu_count()} CPU(s), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
            f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end (other work on the "
            f"machine skews latency). Wall time {wall / 60:.1f} min. Date {time.strftime('%Y-%m-%d %H:%M')}.")


GOAL_PREDICTION = 0.10  # the table's prediction within 10% of the measured latency
GOAL_FASTER = 0.15  # the latency-targeted model at least 15% faster at equal accuracy


def prediction_tables(rows: list[Timed], args: argparse.Namespace) -> list[str]:
    """The table's prediction against the measured median, per model, engine, threads, size."""
    if not any(r.predicted for r in rows):
        return []
    lines = ["## Latency table: predicted against measured", "",
             f"The table (grid {args.table_grid} x {args.table_grid} kept channel counts per layer geometry, median of "
             f"{args.table_repeats} runs per point) was built on the unpruned model; each pruned copy's latency is "
             "predicted from its kept channels, without timing it. Error = predicted / measured - 1 (bold: within "
             f"{GOAL_PREDICTION:.0%}). The table's prediction for the unpruned model is its own whole-model timing "
             "(the non-conv remainder is that timing less the convs), so the unpruned row differs only by how far "
             "the machine drifted between that timing and this one.", ""]
    errors = []
    for size in sorted(args.sizes, reverse=True):
        keys = keys_for(args, size)
        lines += [f"{size} px: measured ms / predicted ms (error)", "",
                  "| model | " + " | ".join(key_label(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for r in rows:
            cells = []
            for k in keys:
                error = r.prediction_error(k)
                if error is None:
                    cells.append("n/a")
                    continue
                if r.reference is not None:
                    errors.append((abs(error), r.label, k))
                mark = f"**{error:+.1%}**" if abs(error) <= GOAL_PREDICTION else f"{error:+.1%}"
                cells.append(f"{r.latency[k]:.1f} / {r.predicted[k]:.1f} ({mark})")
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
        lines.append("")
    if errors:
        values = sorted(e for e, _, _ in errors)
        worst = max(errors)
        within = sum(e <= GOAL_PREDICTION for e in values)
        lines += [f"Goal (predicted within {GOAL_PREDICTION:.0%} of measured): {within} of {len(values)} pruned "
                  f"measurements; median |error| {values[len(values) // 2]:.1%}, largest {worst[0]:.1%} "
                  f"({worst[1]}, {key_label(worst[2])} {worst[2][2]} px).", ""]
    return lines


def report(rows: list[Timed], args: argparse.Namespace, argv: list[str], machine: str,
           frontier: list[str] | None = None) -> str:
    lines = ["# Latency benchmark", "",
             "Command: `" + shlex.join(["python", "bench/latency.py", *argv]) + "`", "", machine, ""]
    if args.quick:
        lines += ["**Quick smoke run (`--quick`): tiny settings, the numbers mean nothing.**", ""]
    spread = max((v for r in rows for v in r.spread.values()), default=0.0)
    lines += [f"Batch 1 on the CPU, median of {args.runs} timed runs after {args.warmup} warm-up runs per model, "
              "engine, thread count and size (torch: eval, inference mode; ONNX Runtime: the TorchScript export at "
              "opset 17, all graph optimisations). Latency gain = 1 - pruned / unpruned median; MACs reduction "
              "counted by Torch-Pruning on the pruned model; ratio = latency gain / MACs reduction. Largest "
              f"(p90 - p10) / median of any measurement: {spread:.0%}.", ""]
    if args.checkpoint:
        lines += ["Models: the given checkpoints, each against a freshly built unpruned model of its architecture.", ""]
    else:
        spec = default_spec(args)
        lines += [f"Models: {spec.arch}-{spec.encoder}, {spec.in_channels} input channel(s), {spec.num_classes} "
                  f"classes, random weights (seed {args.seed}), pruned in-process in one shot to each target for "
                  "each allocator and channel rounding (r8: every kept count a multiple of 8; the group the "
                  "classifier reads stays whole). The scoring network (the method's allocator) was trained "
                  f"{args.scoring_steps} steps on {args.calibration_images} seeded random calibration images "
                  f"({args.calibration_size} px noise with random defect rectangles), not on a dataset: its "
                  "allocation has the method's shape, not the one it would choose for real data. Pruned copies "
                  "keep the group-L1 largest filters; which filters go does not change cost.", ""]
    lines += drift_lines(rows, args)
    lines += models_table(rows, args)
    for size in sorted(args.sizes, reverse=True):
        lines += latency_tables(rows, args, size)
    lines += goal_lines(rows, args)
    lines += rounding_table(rows, args, GOAL_SIZE if GOAL_SIZE in args.sizes else max(args.sizes))
    lines += prediction_tables(rows, args)
    lines += frontier or []
    return "\n".join(lines)


# ------------------------------------------------------------------ latency target vs MACs target
@dataclass
class FrontierRun:
    label: str
    cost: str  # "macs" or "latency"
    target: float  # the reduction asked for (MACs or predicted latency)
    checkpoint: str
    macs_reduction: float
    predicted_ms: float | None  # the table's prediction of the cut (latency runs)
    val_miou: float | None
    test_miou: float | None
    latency: dict[str, float] = field(default_factory=dict)  # engine -> measured median ms
    spread: dict[str, str] = field(default_factory=dict)  # engine -> "p10-p90"


def frontier_table(baseline: Path, size: int, args: argparse.Namespace):
    """The baseline's latency cost model on the table the frontier's prune runs read."""
    from core.allocation.latency import LatencySettings, latency_cost_model
    from core.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(baseline)
    graph = PruningGraph.traced(loaded.model, (size, size), loaded.spec.in_channels)
    return latency_cost_model(graph, LatencySettings(threads=args.frontier_threads, grid=args.table_grid,
                                                     repeats=args.table_repeats))


def run_frontier(args: argparse.Namespace) -> list[FrontierRun]:
    """A baseline on synthetic steel, then one-shot scoring-network cuts to a MACs target and to
    latency targets, each fine-tuned; every result timed in turns."""
    from core.models.checkpoint import load_checkpoint
    from core.profile import latency_in_turns
    from core.services.prune import LatencyTargetError, PruneRequest, run_prune
    from core.services.train import TrainRequest, run_train

    work = args.work
    size = args.frontier_size
    data = dict(format="synthetic-steel", root=str(work / "synthetic"), size=str(size), limit=args.frontier_images,
                threads=max(args.threads), batch_size=8)
    baseline = work / f"baseline-{size}px-{args.frontier_epochs}ep-n{args.frontier_images}-s{args.seed}"
    if not (baseline / "spec.json").is_file():
        start = time.perf_counter()
        run_train(TrainRequest(**data, epochs=args.frontier_epochs, no_early_stop=True, seed=args.seed,
                               out=str(baseline)))
        print(f"frontier baseline trained in {time.perf_counter() - start:.0f} s", flush=True)
    prune_common = dict(checkpoint=str(baseline), method="collaborative", scoring_steps=args.scoring_steps,
                        calibration_images=16, step=0.95, max_rounds=1, finetune_epochs=args.frontier_finetune,
                        no_tolerance_stop=True, seed=args.seed, threads=max(args.threads), batch_size=8,
                        limit=args.frontier_images, latency_threads=args.frontier_threads,
                        latency_grid=args.table_grid, latency_repeats=args.table_repeats)
    plans = [("MACs-targeted", "macs", args.frontier_macs, {"target_macs": args.frontier_macs})]
    # the runs' latency tables live in the workspace (the product's place for them)
    os.environ.setdefault("DEFECTPRUNE_WORKSPACE", str(work / "workspace"))
    runs = []
    table = None
    while plans:
        label, cost, target, extra = plans.pop(0)
        out = work / (f"{cost}-{target:.2f}-{size}px-ft{args.frontier_finetune}-st{args.scoring_steps}"
                      f"-g{args.table_grid}r{args.table_repeats}-s{args.seed}")
        start = time.perf_counter()
        try:
            result = run_prune(PruneRequest(**prune_common, **extra, out=str(out)))
        except LatencyTargetError as exc:  # a factor too far below what the limits allow
            print(f"frontier {label}: {exc}", flush=True)
            continue
        record = result.rounds[-1]
        predicted = record.step["allocation"]["predicted"].get("latency_ms")
        if table is None:  # the MACs-targeted cut's predicted ms on the baseline's table: the latency targets
            table = frontier_table(baseline, size, args)
            kept = record.step["allocation"]["kept"]
            predicted = table.predict(kept)["latency_ms"]
            plans += [(f"latency-targeted x{f:.2f}", "latency", f * predicted,
                       {"target_latency": round(f * predicted, 3)}) for f in sorted(args.frontier_latency, reverse=True)]
        runs.append(FrontierRun(label=label, cost=cost, target=target, checkpoint=result.result["checkpoint"],
                                macs_reduction=record.macs_reduction, predicted_ms=predicted,
                                val_miou=result.result["defect_miou"],
                                test_miou=(result.result.get("test") or {}).get("defect_miou")))
        print(f"frontier {label}: MACs -{record.macs_reduction:.1%}, val defect mIoU {result.result['defect_miou']}"
              f" ({time.perf_counter() - start:.0f} s)", flush=True)
    models = [load_checkpoint(baseline).model.eval()] + [load_checkpoint(r.checkpoint).model.eval() for r in runs]
    timed = latency_in_turns(models, (size, size), 1, runs=args.runs, warmup=args.warmup,
                             threads=args.frontier_threads, onnx="onnxruntime" in args.engines)
    base_val = read_state_base(runs[0].checkpoint)
    base = FrontierRun(label="unpruned", cost="-", target=0.0, checkpoint=str(baseline), macs_reduction=0.0,
                       predicted_ms=None, val_miou=base_val, test_miou=None)
    for r, result in zip([base, *runs], timed):
        r.latency = {engine: res.median_ms for engine, res in result.items()}
        r.spread = {engine: f"{res.p10_ms:.1f}-{res.p90_ms:.1f}" for engine, res in result.items()}
    return [base, *runs]


def read_state_base(round_checkpoint: str) -> float | None:
    """The starting model's val defect mIoU as the prune run measured it (its rounds.json)."""
    import json

    state = json.loads((Path(round_checkpoint).parent / "rounds.json").read_text())
    return state["base"]["defect_miou"]


def frontier_lines(runs: list[FrontierRun], args: argparse.Namespace) -> list[str]:
    engines = list(runs[0].latency)
    size = args.frontier_size
    lines = [f"## Latency target against MACs target at equal accuracy ({size} px)", "",
             f"A Unet-{args.encoder} trained {args.frontier_epochs} epochs on at most {args.frontier_images} synthetic "
             f"steel images per split ({size} px), then cut in one round by the scoring network "
             f"({args.scoring_steps} steps): to {args.frontier_macs:.0%} fewer MACs (closed-form MACs budget), and to "
             "latency targets (`--target-latency`) of " + ", ".join(f"{f:g}" for f in sorted(args.frontier_latency,
                                                                                          reverse=True))
             + " x the MACs-targeted cut's predicted ms on this machine's table (torch, "
             f"{args.frontier_threads} thread(s), grid {args.table_grid}, {args.table_repeats} runs per point); "
             f"each cut fine-tuned {args.frontier_finetune} "
             f"epoch(s). Latency: batch 1, {args.frontier_threads} thread(s), median of {args.runs} runs timed in turns "
             "(p10-p90 in brackets). Small budgets: accuracies are noisy to a point or more.", "",
             "| model | MACs red. | predicted ms | " + " | ".join(f"{ENGINE_LABEL[e]} ms" for e in engines)
             + " | val defect mIoU | test defect mIoU |",
             "|---|---|---|" + "---|" * len(engines) + "---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for r in runs:
        lines.append(f"| {r.label} | {pct(r.macs_reduction)} | {fmt(r.predicted_ms)} | "
                     + " | ".join(f"{r.latency[e]:.1f} ({r.spread[e]})" for e in engines)
                     + f" | {fmt(r.val_miou)} | {fmt(r.test_miou)} |")
    lines.append("")
    macs_run = next(r for r in runs if r.cost == "macs")
    latency_runs = [r for r in runs if r.cost == "latency"]
    tol = args.equal_accuracy
    for engine in engines:
        equal = [r for r in latency_runs if r.val_miou is not None and macs_run.val_miou is not None
                 and r.val_miou >= macs_run.val_miou - tol]
        if not equal:
            lines.append(f"- {ENGINE_LABEL[engine]}: no latency-targeted model is within {tol:g} point(s) of the "
                         f"MACs-targeted model's val defect mIoU ({fmt(macs_run.val_miou)}); goal not shown.")
            continue
        fastest = min(equal, key=lambda r: r.latency[engine])
        faster = 1.0 - fastest.latency[engine] / macs_run.latency[engine]
        verdict = "met" if faster >= GOAL_FASTER else "not met"
        lines.append(f"- {ENGINE_LABEL[engine]}: the fastest latency-targeted model within {tol:g} point(s) of the "
                     f"MACs-targeted one's val defect mIoU ({fmt(fastest.val_miou)} against {fmt(macs_run.val_miou)}) "
                     f"is {fastest.label}: {fastest.latency[engine]:.1f} against {macs_run.latency[engine]:.1f} ms, "
                     f"{faster:.1%} faster (goal at least {GOAL_FASTER:.0%}: {verdict}).")
    return lines + [""]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="input sizes, px (default 128 256)")
    parser.add_argument("--threads", nargs="+", type=int, default=None, help="thread counts (default 1 2)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 5)")
    parser.add_argument("--targets", nargs="+", type=float, default=None, help="MACs reductions (default 0.5 0.8 0.9)")
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATOR_CHOICES), choices=ALLOCATOR_CHOICES)
    parser.add_argument("--round-to", nargs="+", type=int, default=None, help="channel roundings (default 1 8 16)")
    parser.add_argument("--scoring-steps", type=int, default=None, help="scoring-network steps (default 30)")
    parser.add_argument("--calibration-images", type=int, default=8)
    parser.add_argument("--calibration-size", type=int, default=None, help="px (default: the smallest size)")
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--classes", nargs="+", default=DEFAULT_CLASSES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="time this checkpoint instead of in-process pruned copies (repeatable)")
    parser.add_argument("--no-table", dest="table", action="store_false",
                        help="skip the latency table's predictions")
    parser.add_argument("--table-grid", type=int, default=4, help="latency table points per axis (2 to 8)")
    parser.add_argument("--table-repeats", type=int, default=5, help="latency table runs per point (1 to 50)")
    parser.add_argument("--table-folder", type=Path, default=REPO / "bench" / "cache" / "latency_tables",
                        help="where the latency tables are cached")
    parser.add_argument("--frontier", action="store_true",
                        help="also train a small baseline and compare latency- with MACs-targeted pruning at equal "
                             "accuracy")
    parser.add_argument("--frontier-size", type=int, default=128)
    parser.add_argument("--frontier-images", type=int, default=96, help="synthetic images per split at most")
    parser.add_argument("--frontier-epochs", type=int, default=8, help="baseline training epochs")
    parser.add_argument("--frontier-finetune", type=int, default=2, help="fine-tune epochs after each cut")
    parser.add_argument("--frontier-macs", type=float, default=0.8, help="the MACs-targeted run's MACs reduction")
    parser.add_argument("--frontier-latency", nargs="+", type=float, default=None,
                        help="latency targets of the latency-targeted runs, as factors of the MACs-targeted cut's "
                             "predicted ms (default 1.0 0.85 0.7)")
    parser.add_argument("--frontier-threads", type=int, default=1, help="threads the frontier is timed and "
                                                                         "its table measured with")
    parser.add_argument("--equal-accuracy", type=float, default=1.0,
                        help="points of val defect mIoU within which two models count as equally accurate")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "latency-frontier",
                        help="folder for the frontier's checkpoints")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px, 1 thread, 3 runs, one target")
    parser.add_argument("--out", type=Path, default=None, help="report (default bench/results/latency.md)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"sizes": [64] if quick else [128, 256], "threads": [1] if quick else [1, 2],
                "runs": 3 if quick else 30, "warmup": 1 if quick else 5, "targets": [0.8] if quick else [0.5, 0.8, 0.9],
                "round_to": [1, 8] if quick else [1, 8, 16], "scoring_steps": 3 if quick else 30,
                "out": QUICK_OUT if quick else REPO / "bench" / "results" / "latency.md"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.calibration_size is None:
        args.calibration_size = min(args.sizes)
    if any(s < 32 or s % 32 for s in args.sizes):
        parser.error(f"every size must be a multiple of 32 (the encoder's output stride), not {args.sizes}")
    if any(not 0 < t < 1 for t in args.targets):
        parser.error(f"targets are MACs reductions between 0 and 1, not {args.targets}")
    if any(r < 1 for r in args.round_to) or any(t < 1 for t in args.threads):
        parser.error("--round-to and --threads take whole numbers of at least 1")
    if not 2 <= args.table_grid <= 8 or not 1 <= args.table_repeats <= 50:
        parser.error("--table-grid takes 2 to 8 points, --table-repeats 1 to 50 runs")
    if args.frontier_latency is None:
        args.frontier_latency = [1.0, 0.85, 0.7]
    if not 0 < args.frontier_macs < 1 or any(not 0 < f <= 2 for f in args.frontier_latency):
        parser.error("--frontier-macs is a reduction between 0 and 1, --frontier-latency factors above 0 (at most 2)")
    if args.frontier_size < 32 or args.frontier_size % 32:
        parser.error(f"--frontier-size must be a multiple of 32, not {args.frontier_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start, load_start = time.perf_counter(), os.getloadavg()
    rows = run(args)
    frontier = frontier_lines(run_frontier(args), args) if args.frontier else None
    machine = machine_line(args, load_start, os.getloadavg(), time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(rows, args, argv, machine, frontier) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
