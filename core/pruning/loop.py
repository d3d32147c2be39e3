"""The iterative prune-retrain loop (METHOD.md part 4).

Each round: allocate on the current model, select filters, prune for real, fine-tune,
evaluate on validation, record everything, save the round's checkpoint. The loop stops at the
target, at the round limit, on a stop request, or when a round's defect-mIoU drop passes the
tolerance: that round is discarded and the previous one is the result. The test split is
touched once, for the final report.

Every finished round is written to ``<out>/rounds.json`` (atomically) with its checkpoint
``<out>/round_NN``, so an interrupted run resumes from its last finished round.

Under torchrun every rank runs the loop: fine-tunes are data-parallel and validations summed
over the ranks (core.train.distributed), while the scoring network, the pruning decision, the
saves and the latency timings run on rank 0 alone, the decision (channels removed per group)
and the records handed to the other ranks, which cut the same channels.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from core.progress import StageProgress
from core.allocation.context import Batch, StepSettings, pruning_context
from core.atomic import write_json_atomic
from core.errors import DefectPruneError
from core.models.checkpoint import load_checkpoint, save_checkpoint
from core.models.graph import PruningError
from core.models.runtime import model_device
from core.models.zoo import ModelSpec
from core.precision import resolve_precision
from core.profile import count_macs, count_params, measure_latency
from core.allocation.latency import LatencyStopped
from core.pruning.methods import MethodSpec, resolve_method
from core.pruning.step import cut_as_decided, prune_step, prune_to
from core.train import (
    Progress, TrainConfig, class_pixel_counts, class_weights_from_counts, evaluate, fine_tune,
)
from core.train import distributed

ROUNDS_FILE = "rounds.json"
RECOVERED_DIR = "recovered"  # the recovery phase's checkpoint, beside the rounds'


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes and values of the state dict: tells a resumed run whether
    it was handed the model it started from (a retrained baseline has the same shapes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LoopSettings:
    method: str = "collaborative"
    allocator: str | None = None  # ablation overrides
    criterion: str | None = None
    target: float = 0.8  # reduction to reach (fraction: 0.8 = 80% fewer)
    target_kind: str = "macs"  # or "params", or "latency" (a reduction of the latency table's prediction)
    # a latency target: the starting model's predicted ms (the target is 1 - target ms / this);
    # the step settings' ``latency`` says which table
    start_ms: float | None = None
    tolerance: float = 1.0  # largest defect-mIoU drop (points) against the unpruned model
    step: float = 0.3  # share of the remaining MACs removed per round
    # MACs reductions a round lands on exactly instead of stepping past (the benchmark's 50, 70
    # and 80% points on the way to 90%), so methods are compared at the same costs
    milestones: tuple[float, ...] = ()
    finetune_epochs: int = 2
    # the final recovery phase: the last accepted round fine-tuned this many more epochs with its
    # own rate (None: the rounds' rate) and warm-up + cosine schedule; its checkpoint is the result
    recover_epochs: int = 0
    recover_lr: float | None = None
    recover_warmup: float = 0.05
    # distillation weight of the recovery (None: the rounds' ``finetune.distill_weight``)
    recover_distill_weight: float | None = None
    max_rounds: int = 10
    # kept channels per group that the first round cuts to exactly (a fixed allocation tuned on
    # the Layer importance page, `FixedAllocation`); later rounds allocate with the method again
    allocation: dict[str, int] | None = None
    stop_at_tolerance: bool = True  # the benchmark turns this off to trace the whole frontier
    calibration_images: int = 64
    calibration_batch: int = 8
    latency_runs: int = 10
    seed: int = 0
    step_settings: StepSettings = field(default_factory=StepSettings)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, patience=None))

    def validate(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise PruningError(f"target must be a reduction between 0 and 1 (e.g. 0.8), not {self.target}")
        if not 0.0 < self.step < 1.0:
            raise PruningError(f"step must be between 0 and 1 (share of remaining MACs per round), not {self.step}")
        if self.target_kind not in ("macs", "params", "latency"):
            raise PruningError(f"target kind must be macs, params or latency, not {self.target_kind!r}")
        if self.target_kind == "latency" and (self.start_ms is None or self.step_settings.latency is None):
            raise PruningError("a latency target needs the starting model's predicted latency and a latency table")
        if self.tolerance < 0:
            raise PruningError(f"tolerance must be 0 or more points, not {self.tolerance}")
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise PruningError(f"milestones must be reductions between 0 and 1, not {list(self.milestones)}")
        if self.max_rounds < 1 or self.finetune_epochs < 0 or self.recover_epochs < 0:
            raise PruningError("rounds must be at least 1, and fine-tune and recovery epochs 0 or more")
        if self.recover_lr is not None and not (self.recover_lr > 0 and np.isfinite(self.recover_lr)):
            raise PruningError(f"the recovery learning rate must be a positive number, not {self.recover_lr}")
        if self.recover_distill_weight is not None and not 0.0 <= self.recover_distill_weight <= 1.0:
            raise PruningError(f"the recovery distillation weight must be from 0 to 1, not {self.recover_distill_weight}")
        try:
            self.finetune.validate()
        except DefectPruneError as exc:
            raise PruningError(f"fine-tuning settings: {exc}") from None
        resolve_method(self.method, self.allocator, self.criterion)


@dataclass
class RoundRecord:
    round: int
    macs: int
    params: int
    macs_reduction: float
    params_reduction: float
    defect_miou: float | None  # validation
    drop: float | None  # points below the unpruned model's validation defect mIoU
    val: dict[str, Any]
    latency_ms: float
    wall_s: float
    checkpoint: str
    accepted: bool = True
    step: dict[str, Any] = field(default_factory=dict)  # allocation and score summary
    precision: str = ""  # of the round's fine-tune ("" in runs recorded before it was kept)
    distill_weight: float = 0.0  # 0: the round's fine-tune did not distil

    def brief(self) -> dict[str, Any]:
        return {"round": self.round, "macs": self.macs, "params": self.params,
                "defect_miou": self.defect_miou, "drop": self.drop}


@dataclass
class LoopResult:
    rounds: list[RoundRecord]
    result: dict[str, Any]
    stopped: str  # "target", "tolerance", "rounds", "user"
    recovery: dict[str, Any] | None = None  # the recovery phase's record, when it ran

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": [r.brief() for r in self.rounds], "result": self.result, "stopped": self.stopped,
                "recovery": self.recovery, "round_details": [asdict(r) for r in self.rounds]}


def calibration_batches(dataset: Dataset, count: int, batch_size: int, seed: int) -> list[Batch]:
    """A seeded subset of ``dataset`` (the training split, without augmentation), batched."""
    generator = np.random.default_rng(seed)
    chosen = generator.permutation(len(dataset))[: min(count, len(dataset))]
    items = [dataset[int(i)] for i in sorted(chosen)]
    return [
        (torch.stack([x for x, _ in items[i:i + batch_size]]), torch.stack([y for _, y in items[i:i + batch_size]]))
        for i in range(0, len(items), batch_size)
    ]


def is_prune_run(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds only a prune run (``rounds.json``, ``round_NN/``, the
    recovered checkpoint; a run killed before its first record has round folders alone),
    which the loop resumes; anything else there is not the loop's to write over."""
    names = [p.name for p in Path(out_dir).iterdir()]
    return all(n == ROUNDS_FILE or n == RECOVERED_DIR or n.startswith(".")
               or (n.startswith("round_") and n[6:].isdigit()) for n in names)


def read_state(out_dir: str | Path) -> dict[str, Any]:
    """``rounds.json`` checked for form ({} when there is none): an object whose ``rounds`` is a
    list of round records and whose ``base`` is an object. A damaged file is one named error,
    not a crash midway through a resume."""
    from core import safe_json

    path = Path(out_dir) / ROUNDS_FILE
    if not path.is_file():
        return {}
    damaged = (f"{path} is damaged ({{}}); it is the record of the run's finished rounds: restore it, "
               "or start the run in a new --out folder")
    try:
        state = safe_json.read(path, error=PruningError)
    except PruningError as exc:
        raise PruningError(damaged.format(exc)) from None
    if not isinstance(state, dict) or not isinstance(state.get("rounds", []), list) or not isinstance(
            state.get("base", {}), dict):
        raise PruningError(damaged.format("not an object with a list 'rounds' and an object 'base'"))
    fields = RoundRecord.__dataclass_fields__
    required = {name for name, f in fields.items() if f.default is MISSING and f.default_factory is MISSING}
    for number, record in enumerate(state.get("rounds", []), start=1):
        if not isinstance(record, dict) or not required <= set(record) or not set(record) <= set(fields):
            raise PruningError(damaged.format(f"round entry {number} is not a round record"))
    if state.get("rounds") and "base" not in state:
        raise PruningError(damaged.format("it has rounds but no 'base'"))
    return state


def read_rounds(out_dir: str | Path) -> list[RoundRecord]:
    return [RoundRecord(**r) for r in read_state(out_dir).get("rounds", [])]


class _Relay:
    """Turns fine-tuning `Progress` into loop progress within a round's share of the bar."""

    def __init__(self, progress: StageProgress | None, start: float, width: float, label: str):
        self.progress, self.start, self.width, self.label = progress, start, width, label
        self.stop_requested = False  # the callback asked to stop (the step only shortens its work)

    def __call__(self, report: Progress | float, message: str = "") -> bool:
        if self.progress is None:
            return False
        if isinstance(report, Progress):
            fraction = report.fraction
            message = f"{self.label}: {report.phase} epoch {report.epoch}/{report.epochs}"
        else:
            fraction = float(report)
            message = f"{self.label}: {message}"
        if self.progress(self.start + self.width * min(max(fraction, 0.0), 1.0), message):
            self.stop_requested = True
        return self.stop_requested


@dataclass
class RunBase:
    """The model the run starts from, measured once and kept as ``base`` in ``rounds.json``
    (a resumed run reads it back): every reduction and drop is against it."""

    macs: float
    params: float
    defect_miou: float | None  # validation
    val: dict[str, Any] = field(default_factory=dict)
    history: list = field(default_factory=list)  # Torch-Pruning history the run started with
    method: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # the run's LoopSettings, JSON-ready
    fingerprint: str | None = None  # `model_fingerprint` (absent in runs recorded before it)
    # the starting model timed as every round is (absent in runs recorded before it)
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunBase":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def drop(self, val: dict[str, Any]) -> float | None:
        """Points of validation defect mIoU below the base (None when either is unknown)."""
        if val["defect_miou"] is None or self.defect_miou is None:
            return None
        return self.defect_miou - val["defect_miou"]


@dataclass
class LoopState:
    """Where the loop stands: the model as pruned so far, its history, the finished rounds and
    why the loop stops ("rounds" until a reason comes)."""

    model: nn.Module
    history: list
    rounds: list[RoundRecord]
    stopped: str = "rounds"
    progress_done: float | None = None  # the bar's fraction the finished rounds fill (None: not set yet)


@dataclass
class _Run:
    """What every part of one run reads and nothing changes: the data, the settings, the base."""

    spec: ModelSpec
    method: MethodSpec
    train_ds: Dataset
    val_ds: Dataset | None  # what fine-tunes pick their best epoch on (None with a test's evaluator)
    test_ds: Dataset | None
    out_dir: Path
    names: list[str]
    device: torch.device
    settings: LoopSettings
    teacher: nn.Module | None
    validate: Callable[[nn.Module], dict[str, Any]]
    progress: StageProgress | None
    base: RunBase

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.spec.input_size)

    @property
    def state_path(self) -> Path:
        return self.out_dir / ROUNDS_FILE

    def cost_now(self, model: nn.Module) -> tuple[int, int]:
        return count_macs(model, self.size, self.spec.in_channels), count_params(model)


@dataclass
class _Calibration:
    """What every round's pruning step reads from the training split, drawn once per run."""

    batches: list[Batch]
    class_weights: list[float]
    precision: str  # the resolved precision of the step's forward passes


@dataclass
class LoopInputs:
    """What a prune run starts from: the model (already pruned by ``history``, possibly), its
    spec, and the splits it fine-tunes on (``train``), validates each round on (``val``) and
    reports once at the end on (``test``; None: no test report)."""

    model: nn.Module
    spec: ModelSpec
    history: list
    train: Dataset
    val: Dataset
    test: Dataset | None = None


def run_prune_loop(inputs: LoopInputs, out_dir: str | Path, settings: LoopSettings, *,
                   progress: StageProgress | None = None,
                   evaluator: Callable[[nn.Module], dict[str, Any]] | None = None) -> LoopResult:
    """Prune ``inputs.model`` round by round.

    With rounds already in ``out_dir`` (an interrupted run), it resumes after the last
    finished one. ``evaluator`` replaces the validation evaluation (tests script drops)."""
    settings.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _start_run(inputs, out_dir, settings, progress, evaluator)
    state = _resume(run, inputs.model, inputs.history)
    if state.rounds and not state.rounds[-1].accepted:
        state.stopped = "tolerance"
        return _finish(run, state)
    calibration = _calibrate(run)
    for round_index in range(len(state.rounds) + 1, settings.max_rounds + 1):
        macs_now, params_now = run.cost_now(state.model)
        if _reached(settings, run.base, macs_now, params_now, _predicted_ms(settings, state)):
            state.stopped = "target"
            break
        if not _prune_round(run, state, calibration, round_index, macs_now):
            break
    else:
        if _reached(settings, run.base, *run.cost_now(state.model), _predicted_ms(settings, state)):
            state.stopped = "target"
    return _finish(run, state)


def _start_run(inputs: LoopInputs, out_dir: Path, settings: LoopSettings, progress: StageProgress | None,
               evaluator: Callable[[nn.Module], dict[str, Any]] | None) -> _Run:
    """The run's fixed parts: the base read back from ``rounds.json`` (refused when it was
    measured on another model) or measured now, and the teacher of distilled fine-tunes."""
    model, spec, history = inputs.model, inputs.spec, inputs.history
    names = list(spec.classes)
    device = model_device(model)

    def validate_model(m: nn.Module) -> dict[str, Any]:
        if evaluator is not None:
            return evaluator(m)
        return evaluate(m, inputs.val, device=device, batch_size=settings.finetune.eval_batch_size or 8,
                        class_names=names, per_image=False).metrics.to_dict()

    fingerprint = model_fingerprint(model)
    if (out_dir / ROUNDS_FILE).is_file():
        base = RunBase.from_dict(read_state(out_dir)["base"])
        if base.fingerprint is not None and base.fingerprint != fingerprint:
            raise PruningError(f"{out_dir} holds a run that started from another model: resuming it would "
                               "continue that run; choose a new output folder (or delete this one)")
    else:
        base_val = validate_model(model)
        size = tuple(spec.input_size)
        base = RunBase(macs=count_macs(model, size, spec.in_channels), params=count_params(model),
                       defect_miou=base_val["defect_miou"], val=base_val, history=history, method=settings.method,
                       settings=_settings_dict(settings), fingerprint=fingerprint,
                       latency_ms=distributed.on_main(lambda: measure_latency(
                           model, size, spec.in_channels, runs=settings.latency_runs, warmup=2, threads=1).median_ms))
    # the teacher of every distilled fine-tune: the model the run starts from, frozen
    distilling = settings.finetune.distill_weight > 0 or (settings.recover_distill_weight or 0) > 0
    teacher = copy.deepcopy(model).eval() if distilling else None
    method = resolve_method(settings.method, settings.allocator, settings.criterion)
    return _Run(spec=spec, method=method, train_ds=inputs.train, val_ds=inputs.val if evaluator is None else None,
                test_ds=inputs.test, out_dir=out_dir, names=names, device=device, settings=settings, teacher=teacher,
                validate=validate_model, progress=progress, base=base)


def _resume(run: _Run, model: nn.Module, history: list) -> LoopState:
    """The finished rounds in ``out_dir``, and the model of the last accepted one (the given
    model when there is none)."""
    rounds = read_rounds(run.out_dir)
    accepted = [r for r in rounds if r.accepted]
    if accepted:
        loaded = load_checkpoint(accepted[-1].checkpoint, device=run.device)
        model, history = loaded.model, list(loaded.history)
    return LoopState(model=model, history=history, rounds=rounds)


def _calibrate(run: _Run) -> _Calibration:
    settings = run.settings
    weights = class_weights_from_counts(class_pixel_counts(run.train_ds, len(run.names)))
    batches = calibration_batches(_unaugmented(run.train_ds), settings.calibration_images,
                                  settings.calibration_batch, settings.seed)
    return _Calibration(batches=batches, class_weights=list(weights),
                        precision=resolve_precision(settings.finetune.precision, run.device))


def _prune_round(run: _Run, state: LoopState, calibration: _Calibration, round_index: int, macs_now: float) -> bool:
    """One round from ``macs_now``: prune a step, fine-tune, validate, save and record it.
    False when the loop stops after it (``state.stopped`` says why)."""
    settings, base = run.settings, run.base
    final_macs = base.macs * (1.0 - settings.target) if settings.target_kind == "macs" else 0.0
    next_macs = max(macs_now * (1.0 - settings.step), final_macs, *_milestone_macs(settings, base.macs, macs_now))
    # a parameter target: rounds step through MACs as usual, and the round that would pass the
    # target has its cut scaled back to land on it
    params_floor = base.params * (1.0 - settings.target) if settings.target_kind == "params" else None
    start = time.perf_counter()
    offset, share = _round_span(run, state, round_index, macs_now)
    relay = _Relay(run.progress, offset, share * 0.4, f"round {round_index} prune")
    step_settings = replace(settings.step_settings, seed=settings.seed + round_index, precision=calibration.precision)

    def decide() -> tuple[dict[str, list[int]], dict[str, Any], bool, list]:
        try:  # a latency table measures what its cache lacks first (its messages at the round's start)
            context = pruning_context(state.model, run.size, run.spec.in_channels, calibration.batches, run.names,
                                      calibration.class_weights, step_settings,
                                      progress=lambda fraction, message: relay(0.0, message))
        except LatencyStopped:
            return {}, {}, True, []
        reduction = 1.0 - next_macs / macs_now
        if settings.target_kind == "latency":  # the step's share of the predicted ms, landing on the target
            now_ms = context.cost.budget0
            reduction = max(1.0 - max(now_ms * (1.0 - settings.step), _target_ms(settings)) / now_ms, 0.0)
        if round_index == 1 and settings.allocation:
            result = prune_to(context, run.method, settings.allocation, progress=relay)
        else:
            result = prune_step(context, run.method, reduction, progress=relay, params_floor=params_floor)
        return result.removed, result.summary(), relay.stop_requested, result.history

    # the scoring network and the decision run once (rank 0, which cuts its model); under
    # torchrun the other ranks cut the same channels of theirs
    removed, summary, stop_requested, history = distributed.on_main(decide)
    if not distributed.is_main():
        history = cut_as_decided(state.model, run.size, run.spec.in_channels, removed)
    distributed.sync_from_main(state.model)  # the scoring's forward passes ran on rank 0's alone
    if stop_requested:  # cut with a half-trained allocation: never fine-tuned or recorded
        state.stopped = "user"
        return False
    state.history = state.history + history
    precision, distill_weight = "", 0.0
    if settings.finetune_epochs > 0:
        tuned = fine_tune(state.model, run.train_ds, run.val_ds, _finetune_config(settings, round_index),
                          progress=_Relay(run.progress, offset + share * 0.4, share * 0.6,
                                          f"round {round_index} fine-tune"), class_names=run.names,
                          teacher=run.teacher)
        if tuned.stopped_by_user:
            state.stopped = "user"
            return False
        precision, distill_weight = tuned.precision, tuned.distill_weight
    record = _record_round(run, state, round_index, summary, start, precision, distill_weight)
    state.rounds.append(record)
    _write_state(run, state.rounds)
    state.progress_done = offset + share
    if run.progress is not None and run.progress(offset + share, f"round {round_index} done"):
        state.stopped = "user"
        return False
    if not record.accepted:
        state.stopped = "tolerance"
        return False
    return True


def rounds_needed(settings: LoopSettings, base: RunBase, macs_now: float, params_now: float) -> int:
    """The rounds still needed to reach the target from the model's current cost, as the loop
    steps (a share ``step`` of the remaining MACs, landing on each milestone and on the
    target), at least 1: what the progress bar counts instead of the round limit."""
    count, macs, params = 0, float(macs_now), float(params_now)
    final_macs = base.macs * (1.0 - settings.target) if settings.target_kind == "macs" else 0.0
    while not _reached(settings, base, macs, params):
        # parameters shrink about as the MACs do: a parameter target is estimated on that step
        shrink = max(macs * (1.0 - settings.step), final_macs, *_milestone_macs(settings, base.macs, macs)) / macs
        macs, params, count = macs * shrink, params * shrink, count + 1
        if count >= settings.max_rounds:
            break
    return max(count, 1)


def _round_span(run: _Run, state: LoopState, round_index: int, macs_now: float) -> tuple[float, float]:
    """Where round ``round_index`` starts on the progress bar and the width it fills: the rounds
    before it fill ``state.progress_done``, and the rest (less the recovery's share) is split
    evenly over the rounds the target still needs, re-estimated each round from the model's
    cost, so the bar never goes back and reaches the end with the target."""
    settings = run.settings
    rounds_share = 1.0 - _recovery_share(settings)
    left = min(rounds_needed(settings, run.base, macs_now, count_params(state.model)),
               settings.max_rounds - round_index + 1)
    if state.progress_done is None:  # a resumed run: its finished rounds against those still needed
        finished = round_index - 1
        state.progress_done = rounds_share * finished / (finished + left)
    return state.progress_done, max(rounds_share - state.progress_done, 0.0) / left


def _record_round(run: _Run, state: LoopState, round_index: int, step: dict[str, Any], start: float,
                  precision: str, distill_weight: float) -> RoundRecord:
    """Validate the round's model, save its checkpoint and measure it."""
    settings, base, model = run.settings, run.base, state.model
    val = run.validate(model)
    drop = base.drop(val)
    macs, params = run.cost_now(model)
    ok = drop is None or drop <= settings.tolerance or not settings.stop_at_tolerance
    round_spec = ModelSpec.from_dict({**run.spec.to_dict(), "metrics": {"val": val}})

    def save_and_time() -> tuple[str, float]:  # rank 0's: one writer, one clock
        checkpoint = save_checkpoint(run.out_dir / f"round_{round_index:02d}", model, round_spec, state.history)
        return str(checkpoint), measure_latency(model, run.size, run.spec.in_channels, runs=settings.latency_runs,
                                                warmup=2, threads=1).median_ms

    checkpoint, latency = distributed.on_main(save_and_time)
    return RoundRecord(
        round=round_index, macs=macs, params=params,
        macs_reduction=1.0 - macs / base.macs, params_reduction=1.0 - params / base.params,
        defect_miou=val["defect_miou"], drop=drop, val=val, latency_ms=latency,
        wall_s=time.perf_counter() - start, checkpoint=str(checkpoint), accepted=ok, step=step,
        precision=precision, distill_weight=distill_weight,
    )


def _write_state(run: _Run, rounds: list[RoundRecord], **more: Any) -> None:
    if not distributed.is_main():  # rank 0 writes every record
        return
    state = {"base": run.base.to_dict(), "rounds": [asdict(r) for r in rounds], **more}
    write_json_atomic(run.state_path, state, default=float)


def _milestone_macs(settings: LoopSettings, base_macs: float, macs_now: float) -> list[float]:
    """The MACs of the milestones not reached yet (a round stops at the nearest); reached
    within the same 0.1 point as the target (rounded channel counts land a hair short)."""
    return [base_macs * (1.0 - m) for m in settings.milestones if 1.0 - macs_now / base_macs < m - 1e-3]


def _reached(settings: LoopSettings, base: RunBase, macs: float, params: float,
             latency_ms: float | None = None) -> bool:
    if settings.target_kind == "latency" and latency_ms is not None:
        return latency_ms <= _target_ms(settings) * (1 + 1e-3)
    if settings.target_kind in ("macs", "latency"):  # latency without a prediction: estimated on MACs
        return 1.0 - macs / base.macs >= settings.target - 1e-3
    return 1.0 - params / base.params >= settings.target - 1e-3


def _target_ms(settings: LoopSettings) -> float:
    return float(settings.start_ms or 0.0) * (1.0 - settings.target)


def _predicted_ms(settings: LoopSettings, state: LoopState) -> float | None:
    """A latency target's progress: the latency table's prediction for the last accepted
    round's cut (the starting model's before any); None for other targets."""
    if settings.target_kind != "latency":
        return None
    for record in reversed(state.rounds):
        if record.accepted:
            predicted = (record.step.get("allocation") or {}).get("predicted") or {}
            if "latency_ms" in predicted:
                return float(predicted["latency_ms"])
    return settings.start_ms


def _recovery_share(settings: LoopSettings) -> float:
    """The share of the progress bar the recovery phase takes (its epochs against the rounds')."""
    if not settings.recover_epochs:
        return 0.0
    rounds_epochs = max(settings.finetune_epochs, 1) * min(settings.max_rounds, 5)
    return settings.recover_epochs / (settings.recover_epochs + rounds_epochs)


def _recover(run: _Run, best: RoundRecord) -> dict[str, Any] | None:
    """The recovery phase on the last accepted round: ``settings.recover_epochs`` more epochs
    (warm-up + cosine, its own rate, distillation from the run's starting model as set),
    validated every epoch (the best epoch is kept), saved as ``<out>/recovered``. None when
    the user stopped it (a resume runs it again from the round's checkpoint)."""
    settings, base = run.settings, run.base
    start = time.perf_counter()
    loaded = load_checkpoint(best.checkpoint, device=run.device)
    model = loaded.model
    config = _recovery_config(settings)
    share = _recovery_share(settings)
    tuned = fine_tune(model, run.train_ds, run.val_ds, config,
                      progress=_Relay(run.progress, 1.0 - share, share, "recovery"),
                      class_names=run.names, teacher=run.teacher if config.distill_weight > 0 else None)
    if tuned.stopped_by_user:
        return None
    val = run.validate(model)
    recovered_spec = ModelSpec.from_dict({**run.spec.to_dict(), "metrics": {"val": val}})

    def save_and_time() -> tuple[str, float]:  # rank 0's: one writer, one clock
        checkpoint = save_checkpoint(run.out_dir / RECOVERED_DIR, model, recovered_spec, loaded.history)
        return str(checkpoint), measure_latency(model, run.size, run.spec.in_channels, runs=settings.latency_runs,
                                                warmup=2, threads=1).median_ms

    checkpoint, latency = distributed.on_main(save_and_time)
    macs, params = run.cost_now(model)
    return {
        "from_round": best.round, "epochs": settings.recover_epochs, "lr": config.lr,
        "warmup": config.warmup_fraction, "distill_weight": tuned.distill_weight,
        "distill_temperature": config.distill_temperature, "precision": tuned.precision,
        "best_epoch": tuned.best_epoch, "checkpoint": str(checkpoint), "macs": macs, "params": params,
        "macs_reduction": 1.0 - macs / base.macs, "params_reduction": 1.0 - params / base.params,
        "defect_miou": val["defect_miou"], "drop": base.drop(val), "val": val,
        "latency_ms": latency,
        "train_step_seconds": tuned.train_step_seconds, "teacher_step_seconds": tuned.teacher_step_seconds,
        "wall_s": time.perf_counter() - start,
    }


def _recovery_config(settings: LoopSettings) -> TrainConfig:
    """The rounds' fine-tuning settings with the recovery's epochs, seed, rate, schedule and
    distillation weight."""
    config = TrainConfig(**asdict(settings.finetune))
    overrides: dict[str, Any] = {"epochs": settings.recover_epochs, "seed": settings.seed + 999_999,
                                 "patience": None, "schedule": "cosine", "warmup_fraction": settings.recover_warmup}
    if settings.recover_lr is not None:
        overrides["lr"] = settings.recover_lr
    if settings.recover_distill_weight is not None:
        overrides["distill_weight"] = settings.recover_distill_weight
    return replace(config, **overrides)


def _test_metrics(run: _Run, checkpoint: str) -> dict[str, Any]:
    model = load_checkpoint(checkpoint, device=run.device).model
    return evaluate(model, run.test_ds, device=run.device, class_names=run.names, per_image=False).metrics.to_dict()


def _finish(run: _Run, state: LoopState) -> LoopResult:
    """The result: the last accepted round, after the recovery phase when one is asked for,
    with its test metrics (and the pre-recovery round's beside them)."""
    settings, base, rounds, stopped = run.settings, run.base, state.rounds, state.stopped
    recovery = distributed.on_main(lambda: read_state(run.out_dir).get("recovery"))
    accepted = [r for r in rounds if r.accepted]
    best = accepted[-1] if accepted else None
    if recovery is not None and (best is None or recovery.get("from_round") != best.round):
        recovery = None  # recorded on another round (a run resumed with more rounds): redo it
    if best is not None and settings.recover_epochs and recovery is None and stopped != "user":
        recovery = _recover(run, best)
        if recovery is None:
            stopped = "user"
        else:
            _write_state(run, rounds, recovery=recovery)
    if best is not None:
        checkpoint = best.checkpoint
        reductions = (best.macs_reduction, best.params_reduction)
        val_miou, drop = best.defect_miou, best.drop
    else:  # even the first round broke tolerance: the unpruned model is the result
        checkpoint, reductions, val_miou, drop = None, (0.0, 0.0), base.defect_miou, 0.0
    pre_recovery = None
    if recovery is not None:
        pre_recovery = {"round": best.round, "checkpoint": checkpoint, "defect_miou": val_miou, "drop": drop}
        checkpoint, val_miou, drop = recovery["checkpoint"], recovery["defect_miou"], recovery["drop"]
    test, test_skipped = None, None
    if stopped == "user":  # a stop is honoured within seconds: no pass over the test split now
        test_skipped = "the run was stopped; resume it, or evaluate the result checkpoint on the test split"
    elif run.test_ds is not None and len(run.test_ds) and checkpoint is not None:
        test = _test_metrics(run, checkpoint)
        if pre_recovery is not None:
            pre_recovery["test"] = _test_metrics(run, pre_recovery["checkpoint"])
    result = {"checkpoint": checkpoint, "macs_reduction": reductions[0], "params_reduction": reductions[1],
              "defect_miou": val_miou, "drop": drop, "test": test, "base_val_defect_miou": base.defect_miou}
    if pre_recovery is not None:
        result["pre_recovery"] = pre_recovery
    if test_skipped:
        result["test_skipped"] = test_skipped
    more: dict[str, Any] = {"result": result, "stopped": stopped}
    if recovery is not None:
        more["recovery"] = recovery
    _write_state(run, rounds, **more)
    return LoopResult(rounds=rounds, result=result, stopped=stopped, recovery=recovery)


def _finetune_config(settings: LoopSettings, round_index: int) -> TrainConfig:
    # a fixed budget per round (no early stop), the same for every method
    return replace(TrainConfig(**asdict(settings.finetune)), epochs=settings.finetune_epochs,
                   seed=settings.seed + 1000 * round_index, patience=None)


def _unaugmented(dataset: Dataset) -> Dataset:
    if getattr(dataset, "augment", False):
        clone = copy.copy(dataset)
        clone.augment = False
        return clone
    return dataset


def _settings_dict(settings: LoopSettings) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(settings), default=str))
