"""The iterative prune-retrain loop on a checkpoint: ``python -m core prune``, the prune job and
the Prune page. Dataset, root and split seed default to the checkpoint's; the test split is
evaluated once, on the result. Run again on the same ``out`` it resumes after the last
finished round.

`StepRequest` holds the settings of one pruning step (method, its ablation overrides, the
criterion's and the allocator's settings), shared with the score request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.progress import StageProgress
from core.services.datasets import CheckpointDataRequest
from core.services.request import (
    FINITE_FLOAT, FLAG, FRACTION, LIST, NON_NEGATIVE_FINITE, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED,
    UNIT_INTERVAL, Check, ParameterError, setting,
)
from core.services.tracking import tracked, tracking_setting
from core.services.train import precision_setting

if TYPE_CHECKING:
    from core.pruning.loop import LoopResult, LoopSettings
    from core.pruning.step import StepSettings


def _methods() -> list[str]:
    from core.pruning.methods import METHODS

    return list(METHODS)


def _allocators() -> list[str]:
    from core.allocation.registry import ALLOCATORS

    return list(ALLOCATORS)


def _criteria() -> list[str]:
    from core.importance.criteria import CRITERIA

    return list(CRITERIA)


LATENCY_ENGINES = ("torch", "onnxruntime")  # core.allocation.latency.ENGINES (torch-free here)
COSTS = ("macs", "latency")


def _latency_grid_problem(value: int) -> str | None:
    return None if 2 <= value <= 8 else f"{value} must be from 2 to 8 (points per axis of the latency grid)"


def _latency_repeats_problem(value: int) -> str | None:
    return None if 1 <= value <= 50 else f"{value} must be from 1 to 50 (timed runs per grid point)"


def _latency_threads_problem(value: int) -> str | None:
    return None if 1 <= value <= 256 else f"{value} must be from 1 to 256"


LATENCY_GRID = Check(int, "a whole number", _latency_grid_problem)
LATENCY_REPEATS = Check(int, "a whole number", _latency_repeats_problem)
LATENCY_THREADS = Check(int, "a whole number", _latency_threads_problem)


def _correlation_sources() -> list[str]:
    from core.importance.substitutability import CORRELATION_SOURCES

    return list(CORRELATION_SOURCES)


@dataclass(frozen=True, kw_only=True)
class StepRequest(CheckpointDataRequest):
    """A checkpoint, its dataset and how one pruning step scores and allocates."""

    method: str = setting("collaborative", choices=_methods)
    allocator: str | None = setting(None, choices=_allocators, help="ablation: override the allocator")
    criterion: str | None = setting(None, choices=_criteria, help="ablation: override the criterion")
    beta: float = setting(0.5, check=FINITE_FLOAT, help="weight of substitutability in the score")
    correlation: str = setting("activations", choices=_correlation_sources,
                               help="substitutability from the channels' responses on calibration images (default) "
                                    "or, without data, from the cosine of the filters' weights")
    scoring_steps: int = setting(300, check=POSITIVE_INT, help="scoring-network steps per round")
    calibration_images: int = setting(64, check=POSITIVE_INT)
    max_prune_ratio: float = setting(0.9, check=FRACTION, help="largest share cut from one layer")
    round_to: int = setting(1, check=POSITIVE_INT, help="keep channel counts multiples of this")
    cut_head_input: bool = setting(False, kind=FLAG,
                                   help="let allocators cut the layer the classifier reads (kept whole by default)")
    seed: int = setting(0, check=SEED)
    precision: str = precision_setting()
    cost: str = setting("macs", choices=COSTS,
                        help="what the allocators budget: the closed-form MACs, or latency from a per-layer table "
                             "measured on this machine (cached under the workspace's latency_tables/); with latency "
                             "a reduction target (--target-macs, --target) reads as a latency reduction")
    latency_engine: str = setting("torch", choices=LATENCY_ENGINES, help="the engine the latency table times")
    latency_threads: int = setting(1, check=LATENCY_THREADS, help="CPU threads the latency table is timed with")
    latency_grid: int = setting(4, check=LATENCY_GRID, help="kept-channel points per axis the latency table times "
                                                            "each layer at (2 to 8)")
    latency_repeats: int = setting(5, check=LATENCY_REPEATS, help="timed runs per latency-table point (1 to 50)")

    @property
    def uses_latency(self) -> bool:
        return self.cost == "latency" or getattr(self, "target_latency", None) is not None

    def latency_settings(self):
        """The latency table's settings, or None when the step budgets MACs."""
        if not self.uses_latency:
            return None
        from core.allocation.latency import LatencySettings

        return LatencySettings(engine=self.latency_engine, threads=self.latency_threads, grid=self.latency_grid,
                               repeats=self.latency_repeats)

    def step_settings(self, precision: str | None = None) -> StepSettings:
        """The step's settings; ``precision``: the resolved name its forward passes run in
        (None: the step's default, for the loop, which sets it from its fine-tunes')."""
        from core.allocation.base import AllocationLimits
        from core.allocation.context import ScoringNetworkSettings
        from core.pruning.step import StepSettings

        return StepSettings(
            beta=self.beta, correlation=self.correlation, seed=self.seed,
            **({} if precision is None else {"precision": precision}),
            scoring=ScoringNetworkSettings(steps=self.scoring_steps, seed=self.seed),
            limits=AllocationLimits(max_prune_ratio=self.max_prune_ratio, round_to=self.round_to,
                                    protect_head_input=not self.cut_head_input),
            latency=self.latency_settings())


@dataclass(frozen=True, kw_only=True)
class PruneRequest(StepRequest):
    KIND = "prune"

    # the target unless another is given (then None: `Request` unsets a default that yields)
    target_macs: float | None = setting(0.8, check=FRACTION, exclusive="target",
                                        help="MACs reduction to reach (0.8)")
    target_params: float | None = setting(None, check=FRACTION, exclusive="target",
                                          help="parameter reduction to reach")
    target_latency: float | None = setting(None, check=POSITIVE_FLOAT, exclusive="target", metavar="MS",
                                           help="latency to reach, in ms, as the latency table of this machine "
                                                "predicts it (see --latency-engine, --latency-threads)")
    tolerance: float = setting(1.0, check=NON_NEGATIVE_FINITE, help="largest defect-mIoU drop, in points")
    no_tolerance_stop: bool = setting(False, kind=FLAG, help="keep going past the tolerance (trace the whole frontier)")
    step: float = setting(0.3, check=FRACTION, help="share of the remaining MACs removed per round")
    milestones: tuple[float, ...] = setting(kind=LIST, check=FRACTION, metavar="REDUCTION",
                                            help="MACs reductions a round lands on exactly on its way to the target "
                                                 "(0.5 0.7)")
    finetune_epochs: int = setting(2, check=NON_NEGATIVE_INT)
    max_rounds: int = setting(10, check=POSITIVE_INT)
    lr: float = setting(1e-3, check=POSITIVE_FLOAT, help="fine-tuning learning rate")
    recover_epochs: int = setting(0, check=NON_NEGATIVE_INT,
                                  help="final recovery phase: fine-tune the last accepted round this many more epochs "
                                       "(warm-up + cosine); its checkpoint becomes the result (0: none)")
    recover_lr: float | None = setting(None, check=POSITIVE_FLOAT,
                                       help="learning rate of the recovery phase (default: --lr)")
    distill_weight: float = setting(0.0, check=UNIT_INTERVAL,
                                    help="distil every fine-tune from the run's starting model: loss = (1 - a) x "
                                         "supervised + a x T^2 x KL (0: off)")
    distill_temperature: float = setting(2.0, check=POSITIVE_FLOAT, help="distillation temperature T")
    recover_distill_weight: float | None = setting(None, check=UNIT_INTERVAL,
                                                   help="distillation weight of the recovery phase (default: "
                                                        "--distill-weight)")
    allocation: str | None = setting(None, metavar="FILE.json",
                                     help="a fixed allocation (the Layer importance page's JSON: kept channels per "
                                          "layer for this checkpoint) the first round cuts to exactly")
    out: str | None = setting(None, required=True, job=False, help="folder for the rounds' checkpoints and rounds.json")
    mlflow_uri: str | None = tracking_setting()

    def loop_settings(self, device: str, allocation: dict[str, int] | None = None,
                      latency: tuple[float, float] | None = None) -> LoopSettings:
        """The loop's settings (fine-tunes on ``device``; ``allocation``: the fixed allocation's
        kept counts, read and checked by `run_prune`; ``latency``: a latency target as (latency
        reduction, the starting model's predicted ms), from `latency_target`)."""
        from core.pruning.loop import LoopSettings
        from core.train import TrainConfig

        kind, target = ("params", self.target_params) if self.target_params else ("macs", self.target_macs)
        start_ms = None
        if latency is not None:
            (target, start_ms), kind = latency, "latency"
        return LoopSettings(
            method=self.method, allocator=self.allocator, criterion=self.criterion, target=target,
            target_kind=kind, tolerance=self.tolerance, step=self.step, milestones=tuple(self.milestones),
            finetune_epochs=self.finetune_epochs, recover_epochs=self.recover_epochs, recover_lr=self.recover_lr,
            recover_distill_weight=self.recover_distill_weight,
            max_rounds=self.max_rounds, allocation=allocation, stop_at_tolerance=not self.no_tolerance_stop,
            calibration_images=self.calibration_images, seed=self.seed, start_ms=start_ms,
            step_settings=self.step_settings(),
            finetune=TrainConfig(epochs=max(self.finetune_epochs, 1), batch_size=self.batch_size, lr=self.lr,
                                 patience=None, seed=self.seed, num_threads=self.threads, device=str(device),
                                 num_workers=self.workers, precision=self.precision,
                                 distill_weight=self.distill_weight, distill_temperature=self.distill_temperature),
        )


@tracked  # logged to MLflow where a tracking URI is set (core.services.tracking)
def run_prune(request: PruneRequest, progress: StageProgress | None = None) -> LoopResult:
    """Run (or resume) the loop in ``request.out``."""
    from core.atomic import check_output_folder
    from core.data.dataset import SegmentationDataset
    from core.models.checkpoint import load_checkpoint, read_spec
    from core.models.graph import PruningGraph
    from core.pruning.loop import LoopInputs, is_prune_run, run_prune_loop
    from core.pruning.step import FixedAllocation
    from core.train import TorchThreads, distributed, resolve_device

    if not request.out:
        raise ParameterError("pruning needs the folder for its rounds (--out)")
    # before anything is loaded: a dataset folder or the source checkpoint is never an output,
    # nor a folder holding something other than an earlier run of this kind (resumed)
    dataset_root = request.root if request.root is not None else read_spec(request.checkpoint).dataset_root
    check_output_folder(request.out, "prune run (rounds.json and its rounds)", is_prune_run,
                        protected=[("the checkpoint", request.checkpoint), ("the dataset folder", dataset_root)])
    device = resolve_device(request.device)
    fixed = FixedAllocation.read(request.allocation) if request.allocation else None
    loaded = load_checkpoint(request.checkpoint, device=device)
    spec = loaded.spec
    if fixed is not None:  # refused before the dataset is read or anything is cut
        fixed.check(PruningGraph.traced(loaded.model, tuple(spec.input_size), spec.in_channels), request.allocation)
    with distributed.main_first():  # under torchrun rank 0 generates a synthetic set before the others read it
        index, size = request.dataset(spec)
    spec.input_size = size
    datasets = {
        split: SegmentationDataset(index, split, size, spec.in_channels, augment=split == "train",
                                   seed=request.seed, limit=request.limit, normalisation=spec.normalisation)
        for split in ("train", "val", "test")
    }
    latency = None
    if request.uses_latency:
        if request.target_params is not None:
            raise LatencyTargetError("--target-params cannot be reached with --cost latency: give a latency reduction "
                                     "(--target-macs with --cost latency) or --target-latency MS")
        graph = PruningGraph.traced(loaded.model, size, spec.in_channels)
        # under torchrun rank 0 times the table and every rank takes its target (one clock, one decision)
        latency = distributed.on_main(lambda: latency_target(
            request, graph, request.target_latency, request.target_macs,
            progress=None if progress is None else (lambda f, m: progress(0.0, m))))
    settings = request.loop_settings(str(device), None if fixed is None else fixed.kept, latency)
    with TorchThreads(request.threads):
        inputs = LoopInputs(loaded.model, spec, list(loaded.history), datasets["train"], datasets["val"],
                            datasets["test"])
        return run_prune_loop(inputs, request.out, settings, progress=progress)



class LatencyTargetError(ParameterError):
    """A latency target this model cannot reach (or has reached already) on this machine's table."""


def latency_target(request: StepRequest, graph, target_ms: float | None, reduction: float | None,
                   progress: StageProgress | None = None) -> tuple[float, float]:
    """A latency target as (latency reduction, the model's predicted ms), from ``target_ms``
    or else ``reduction``, on this machine's latency table for ``graph``'s model (what the cache
    lacks is measured: ``progress`` follows it). A target the per-layer limits cannot reach, or
    one the model already meets, is a `LatencyTargetError` naming both numbers."""
    from core.allocation.latency import latency_cost_model

    settings = request.latency_settings()
    cost = latency_cost_model(graph, settings, progress)
    start = cost.budget0
    smallest = cost.smallest_ms(request.step_settings().limits)
    where = (f"{settings.engine}, {settings.threads} thread(s), {graph.example_inputs.shape[-1]} px, "
             f"this machine's latency table")
    if target_ms is None:
        target_ms = start * (1.0 - reduction)
        asked = f"a {reduction:.0%} latency reduction ({target_ms:.2f} ms)"
    else:
        asked = f"--target-latency {target_ms:g} ms"
    if target_ms >= start:
        raise LatencyTargetError(f"{asked} is not below the model's predicted {start:.2f} ms ({where}): nothing "
                                 "to prune; choose a smaller target")
    if target_ms < smallest:
        raise LatencyTargetError(f"{asked} is below {smallest:.2f} ms, the fastest this model can be cut to within "
                                 f"the per-layer limits (--max-prune-ratio {request.max_prune_ratio:g}, at least 2 "
                                 f"channels, the classifier's input kept whole) ({where}); choose at least that")
    return 1.0 - target_ms / start, start
