"""Job kinds: what the worker runs, each a function of a `JobContext`.

A job's parameters are JSON and mirror the command line: each key is the ``dest`` of the
command's option (``--batch-size`` -> ``batch_size``, ``--option K=V`` -> ``option: {K: V}``),
and they are parsed by the command's own argparse parser, so a job accepts exactly what the
command accepts, with the same defaults and the same checks. Where the command writes a file
(``--out``, ``--per-image``) the job decides: outputs go under ``<workspace>/runs/<job_id>/``.

The jobs call the same functions as the commands (``train_from_args``, ``evaluate_from_args``,
``prune_from_args``, ``export_from_args``); only the progress callback differs: it hands the
latest progress to the context, which a heartbeat thread writes to the store about once a
second, and it answers "stop" when the store says a stop was requested.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DefectPruneError
from core.runs.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_npz
from core.runs.store import JOB_KINDS, STOPPED, JobRecord, Store
from core.train import Progress, StopRequested

HEARTBEAT_SECONDS = 1.0

# parameters the job sets itself (outputs go to the job's folder)
FIXED_PARAMS: dict[str, tuple[str, ...]] = {
    "train": ("out", "json"),
    "evaluate": ("per_image", "json"),
    "prune": ("out", "json"),
    "export": ("out", "json"),
    "score": (),
}
# kinds that start from a checkpoint and may take its dataset from the store
CHECKPOINT_KINDS = ("evaluate", "prune", "score", "export")
DATASET_KINDS = ("evaluate", "prune", "score")


class JobParameterError(DefectPruneError):
    """A job's parameters are not what its command accepts."""


# ---------------------------------------------------------------- parameters
class _ParamParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise JobParameterError(message)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise JobParameterError((message or f"argument parsing stopped ({status})").strip())


def _score_parser(sub: argparse._SubParsersAction) -> None:
    """The score job's options: the prune command's, for one allocation without cutting."""
    from core.allocation.baselines import ALLOCATORS
    from core.cli import add_device_argument, add_precision_argument, finite_float, seed_int
    from core.commands.prune import fraction
    from core.cli import positive_int
    from core.commands.train import add_data_arguments
    from core.importance.criteria import CRITERIA
    from core.pruning.methods import METHODS

    parser = sub.add_parser("score")
    parser.add_argument("--checkpoint", required=True)
    add_data_arguments(parser, required=False)
    parser.add_argument("--split-seed", type=seed_int, default=None)
    parser.add_argument("--method", default="collaborative", choices=list(METHODS))
    parser.add_argument("--allocator", default=None, choices=ALLOCATORS)
    parser.add_argument("--criterion", default=None, choices=CRITERIA)
    parser.add_argument("--target", type=fraction, default=0.5, help="MACs reduction the allocation aims at")
    parser.add_argument("--beta", type=finite_float, default=0.5)
    parser.add_argument("--scoring-steps", type=positive_int, default=300)
    parser.add_argument("--calibration-images", type=positive_int, default=64)
    parser.add_argument("--max-prune-ratio", type=fraction, default=0.9)
    parser.add_argument("--round-to", type=positive_int, default=1)
    parser.add_argument("--seed", type=seed_int, default=0)
    add_device_argument(parser)
    add_precision_argument(parser)


def job_parser(kind: str) -> argparse.ArgumentParser:
    """The argparse parser whose options a job of ``kind`` takes."""
    if kind not in JOB_KINDS:
        raise JobParameterError(f"unknown job kind {kind!r}; choose one of {', '.join(JOB_KINDS)}")
    root = _ParamParser(prog="job", add_help=False)
    sub = root.add_subparsers(dest="command")
    if kind == "score":
        _score_parser(sub)
        return sub.choices["score"]
    if kind == "export":
        from core.commands import export_onnx

        export_onnx.add_parser(sub)
        parser = sub.choices["export-onnx"]
        parser.add_argument("--no-profile", action="store_true", help="skip params/MACs/latency")
        parser.add_argument("--runs", type=int, default=20, help="timed runs per engine")
        parser.add_argument("--warmup", type=int, default=3)
        parser.add_argument("--threads", type=int, default=1, help="CPU threads while timing")
        return parser
    import importlib

    module = importlib.import_module(f"core.commands.{kind}")
    module.add_parser(sub)
    return sub.choices[kind]


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def params_to_argv(kind: str, params: dict[str, Any]) -> list[str]:
    """JSON parameters -> the command-line arguments they stand for."""
    if not isinstance(params, dict):
        raise JobParameterError(f"{kind} job parameters must be a JSON object, not {type(params).__name__}")
    actions = _option_actions(job_parser(kind))
    fixed = FIXED_PARAMS[kind]
    argv: list[str] = []
    for key, value in params.items():
        action = actions.get(key)
        if action is None or key in fixed:
            known = ", ".join(sorted(k for k in actions if k not in fixed))
            raise JobParameterError(f"unknown parameter {key!r} for a {kind} job; known: {known}")
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise JobParameterError(f"{kind} job parameter {key} must be true or false, not {value!r}")
            if value:
                argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            items = ([f"{k}={json.dumps(v)}" for k, v in value.items()] if isinstance(value, dict)
                     else [str(v) for v in (value if isinstance(value, list) else [value])])
            for item in items:
                argv += [flag, item]
        elif value is None:
            continue
        elif action.nargs in ("+", "*") and isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, (dict, list)):
            raise JobParameterError(f"{kind} job parameter {key} must be a single value, not {value!r}")
        else:
            argv += [flag, str(value)]
    return argv


def parse_params(kind: str, params: dict[str, Any], **fixed: Any) -> argparse.Namespace:
    """The command's namespace for ``params``, with the job-set options (``fixed``) filled
    in; raises `JobParameterError` for anything the command would refuse."""
    argv = params_to_argv(kind, params)
    for key, value in fixed.items():
        if value is not None and key in FIXED_PARAMS[kind] and key != "json":
            argv += ["--" + key.replace("_", "-"), str(value)]
    try:
        args = job_parser(kind).parse_args(argv)
    except JobParameterError as exc:
        raise JobParameterError(f"{kind} job parameters: {exc} (parameters are the command's options with "
                                "_ for -, e.g. batch_size)") from None
    for key, value in fixed.items():
        setattr(args, key, value)
    return args


def validate_params(kind: str, params: dict[str, Any]) -> None:
    """Refuse bad parameters at submission rather than when the job runs."""
    placeholders = {"out": "<job folder>"} if "out" in FIXED_PARAMS.get(kind, ()) else {}
    parse_params(kind, params, **placeholders)


# ---------------------------------------------------------------- context
class JobContext:
    """What a running job sees: its parameters and folder, a progress sink, the stop flag.

    ``progress`` only records the latest report in memory (cheap, safe to call every batch);
    the heartbeat thread writes it with the heartbeat about once a second and sets
    ``stop_event`` when the store says a stop was requested."""

    def __init__(self, store: Store, job: JobRecord):
        self.store = store
        self.job = job
        self.job_id = job.id
        self.kind = job.kind
        self.params = dict(job.params)
        self.out_dir = store.job_dir(job.id)
        self.stop_event = threading.Event()
        self.final_state: str | None = None  # a job that ends "stopped" says so here
        self.final_message: str | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._metrics: dict[str, Any] = dict(job.metrics or {})
        self._start = time.monotonic()
        self._start_fraction: float | None = None
        self.fraction = float(job.progress)  # the latest reported

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested()

    def progress(self, fraction: float, message: str, eta_seconds: float | None = None,
                 metrics: dict[str, Any] | None = None) -> bool:
        """Record progress; returns True when the job should stop."""
        fraction = float(min(max(fraction, 0.0), 1.0))
        self.fraction = fraction
        if self._start_fraction is None:
            self._start_fraction, self._start = fraction, time.monotonic()
        if eta_seconds is None:  # from this attempt's pace (a resumed job starts part-way)
            done = fraction - self._start_fraction
            if done > 0.005:
                eta_seconds = (time.monotonic() - self._start) / done * (1.0 - fraction)
        with self._lock:
            if metrics:
                self._metrics.update(metrics)
            self._pending = {"progress": fraction, "message": message, "eta_seconds": eta_seconds,
                             "metrics": dict(self._metrics)}
        return self.stop_event.is_set()

    def take_pending(self) -> dict[str, Any]:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending or {}

    def flush(self) -> None:
        """Write the latest progress now (from the calling thread's connection)."""
        if self.store.heartbeat(self.job_id, **self.take_pending()):
            self.stop_event.set()

    def stopped(self, message: str) -> None:
        self.final_state, self.final_message = STOPPED, message


class Heartbeat(threading.Thread):
    """Marks the job alive every second with its latest progress and picks up stop
    requests. With ``parent_pid`` it ends the whole process when the worker that started it
    is gone, so a killed worker never leaves a job running unsupervised."""

    def __init__(self, context: JobContext, parent_pid: int | None = None, interval: float = HEARTBEAT_SECONDS):
        super().__init__(name=f"heartbeat-{context.job_id}", daemon=True)
        self.context, self.parent_pid, self.interval = context, parent_pid, interval
        self.done = threading.Event()
        self.errors = 0

    def run(self) -> None:
        while not self.done.wait(self.interval):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                os._exit(137)  # the worker died (SIGKILL): die with it; finished rounds are on disk
            try:
                if self.context.store.heartbeat(self.context.job_id, **self.context.take_pending()):
                    self.context.stop_event.set()
            except Exception as exc:  # a busy or full disk: keep trying, the job goes on
                self.errors += 1
                print(f"heartbeat of job {self.context.job_id} failed: {exc}", flush=True)
        self.context.store.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


# ---------------------------------------------------------------- helpers
def _train_relay(ctx: JobContext, label: str = "") -> Callable[[Progress], bool]:
    """`fit` / `evaluate` progress -> context progress with the latest metrics, and the
    per-epoch curve (loss, val defect mIoU) the Model page draws."""
    curve: list[dict[str, Any]] = []

    def relay(report: Progress) -> bool:
        metrics: dict[str, Any] = {"phase": report.phase}
        if report.epochs:
            metrics["epoch"] = report.epoch
        if report.loss is not None:
            metrics["loss"] = round(float(report.loss), 5)
        if report.metric is not None:
            metrics["val_defect_miou"] = round(float(report.metric), 3)
        if report.phase == "train":
            message = f"epoch {report.epoch}/{report.epochs}, step {report.step}/{report.steps}"
        elif report.phase == "validate":
            message = f"epoch {report.epoch}/{report.epochs}, validating {report.step}/{report.steps}"
        elif report.phase == "epoch":
            curve.append({"epoch": report.epoch, "loss": metrics.get("loss"), "val_defect_miou": metrics.get("val_defect_miou")})
            metrics["curve"] = list(curve)
            metric = "n/a" if report.metric is None else f"{report.metric:.2f}"
            message = f"epoch {report.epoch}/{report.epochs} done, val defect mIoU {metric}"
        else:
            message = f"{report.phase} {report.step}/{report.steps}"
        return ctx.progress(report.fraction, f"{label}{message}", report.eta_seconds, metrics)

    return relay


def _model_facts(checkpoint: str | Path) -> dict[str, Any]:
    """Architecture, params and MACs of a checkpoint, for the models table."""
    from core.models.checkpoint import load_checkpoint
    from core.profile import count_macs, count_params

    loaded = load_checkpoint(checkpoint, device="cpu")
    spec = loaded.spec
    return {"arch": spec.arch, "encoder": spec.encoder, "pruned": bool(loaded.history),
            "params": count_params(loaded.model),
            "macs": count_macs(loaded.model, tuple(spec.input_size), spec.in_channels),
            "metrics": spec.metrics}


def _register_checkpoint(ctx: JobContext, checkpoint: str | Path, parent_id: int | None = None,
                         facts: dict[str, Any] | None = None) -> int:
    facts = facts if facts is not None else _model_facts(checkpoint)
    model_id = ctx.store.register_model(checkpoint, job_id=ctx.job_id, dataset_id=ctx.job.dataset_id,
                                        parent_id=parent_id, **facts)
    ctx.store.add_artifact("checkpoint", checkpoint, job_id=ctx.job_id, model_id=model_id)
    return model_id


def _base_model_id(ctx: JobContext, checkpoint: str | Path) -> int | None:
    found = ctx.store.find_model(checkpoint)
    return found["id"] if found else None


# ---------------------------------------------------------------- job kinds
def run_train(ctx: JobContext) -> dict[str, Any]:
    """Train from scratch; the checkpoint goes to ``runs/<id>/checkpoint``."""
    from core.commands.train import TRAINING_HISTORY_FILE, train_from_args

    checkpoint = ctx.out_dir / "checkpoint"
    args = parse_params("train", ctx.params, out=str(checkpoint))
    payload = train_from_args(args, progress=_train_relay(ctx))
    model_id = _register_checkpoint(ctx, payload["checkpoint"])
    history = Path(payload["checkpoint"]) / TRAINING_HISTORY_FILE
    if history.is_file():
        ctx.store.add_artifact("training-history", history, job_id=ctx.job_id, model_id=model_id)
    payload["model_id"] = model_id
    if payload["stopped_by_user"]:
        ctx.stopped(f"stopped after {payload['epochs_run']} epoch(s); the best weights so far were saved")
    return payload


def run_evaluate(ctx: JobContext) -> dict[str, Any]:
    """Metrics of a checkpoint on a split; ``evaluation.json`` and ``per_image.csv``."""
    from core.commands.evaluate import evaluate_from_args

    args = parse_params("evaluate", ctx.params, per_image=None)
    payload, result = evaluate_from_args(args, progress=_train_relay(ctx))
    csv = atomic_write_bytes(ctx.out_dir / "per_image.csv", result.per_image.to_csv(index=False).encode("utf-8"))
    report = atomic_write_json(ctx.out_dir / "evaluation.json", payload)
    model_id = _base_model_id(ctx, args.checkpoint)
    ctx.store.add_artifact("per-image", csv, job_id=ctx.job_id, model_id=model_id)
    ctx.store.add_artifact("evaluation", report, job_id=ctx.job_id, model_id=model_id)
    ctx.progress(1.0, f"{payload['split']}: defect mIoU {payload.get('defect_miou')}",
                 metrics={"defect_miou": payload.get("defect_miou")})
    return payload


def _round_facts(record: dict[str, Any]) -> dict[str, Any]:
    """The models table's facts of a round's (or the recovery's) checkpoint, from its record
    and its spec (no weights loaded)."""
    facts = {"arch": "", "encoder": "", "pruned": True, "params": int(record["params"]), "macs": int(record["macs"]),
             "metrics": {"split": "val", **(record.get("val") or {})}}
    try:
        from core.models.checkpoint import read_spec

        spec = read_spec(record["checkpoint"])
        facts["arch"], facts["encoder"] = spec.arch, spec.encoder
    except DefectPruneError:
        pass
    return facts


def sync_rounds(ctx: JobContext, prune_run_id: int, out_dir: Path, base_model_id: int | None,
                registered: dict[int, int]) -> int:
    """Mirror ``rounds.json`` (written atomically by the loop after every round) into the
    store, registering each round's checkpoint as a model, and the recovery phase's (when it
    ran) with its record in the run's result. Returns the number of rounds."""
    from core.pruning.loop import ROUNDS_FILE, read_state

    path = out_dir / ROUNDS_FILE
    if not path.is_file():
        return 0
    state = read_state(out_dir)
    rounds = state.get("rounds", [])
    for r in rounds:
        number = int(r["round"])
        if number not in registered and Path(r["checkpoint"]).is_dir():
            registered[number] = _register_checkpoint(ctx, r["checkpoint"], parent_id=base_model_id,
                                                      facts=_round_facts(r))
    count = ctx.store.save_rounds(prune_run_id, rounds, registered)
    result, recovery = state.get("result"), state.get("recovery")
    if recovery is not None:
        # the store has no column for it: it rides in the run's result (written before the
        # result itself, while the test split is evaluated), where the Prune page reads it
        result = {**(result or {}), "recovery": recovery}
        if Path(recovery["checkpoint"]).is_dir():  # re-registered each sync: a redone recovery updates it
            facts = _round_facts(recovery)
            facts["metrics"]["recovery"] = {"from_round": recovery.get("from_round"), "epochs": recovery.get("epochs")}
            _register_checkpoint(ctx, recovery["checkpoint"], parent_id=base_model_id, facts=facts)
    ctx.store.update_prune_run(prune_run_id, base=state.get("base"), result=result, stopped=state.get("stopped"))
    if rounds:
        last = rounds[-1]
        ctx.progress(ctx.fraction, f"round {last['round']} done",
                     metrics={"round": last["round"], "macs_reduction": last["macs_reduction"],
                              "params_reduction": last["params_reduction"], "val_defect_miou": last["defect_miou"],
                              "drop": last["drop"]})
    return count


def run_prune(ctx: JobContext) -> dict[str, Any]:
    """The prune-retrain loop in ``runs/<id>/prune``; run again (resume) it continues after
    the last finished round. Rounds are mirrored into the store as they finish."""
    from core.commands.prune import prune_from_args
    from core.pruning.loop import ROUNDS_FILE

    out_dir = ctx.out_dir / "prune"
    args = parse_params("prune", ctx.params, out=str(out_dir))
    base_model_id = _base_model_id(ctx, args.checkpoint)
    prune_run_id = ctx.store.upsert_prune_run(ctx.job_id, args.checkpoint, out_dir, args.method, ctx.params,
                                              base_model_id=base_model_id)
    registered = {r["round"]: r["model_id"] for r in ctx.store.list_rounds(ctx.job_id) if r["model_id"]}
    resumed_from = sync_rounds(ctx, prune_run_id, out_dir, base_model_id, registered)
    rounds_file = out_dir / ROUNDS_FILE
    seen = {"stamp": _stamp(rounds_file)}

    def progress(fraction: float, message: str) -> bool:
        stamp = _stamp(rounds_file)
        if stamp != seen["stamp"]:  # a round finished: mirror it before anything else
            seen["stamp"] = stamp
            sync_rounds(ctx, prune_run_id, out_dir, base_model_id, registered)
            ctx.flush()
        if ctx.progress(fraction, message):
            raise StopRequested()  # out of the scoring network too, not only fine-tuning
        return False

    if resumed_from:
        ctx.progress(ctx.fraction, f"resuming after round {resumed_from}")
        ctx.flush()
    result = prune_from_args(args, progress=progress)
    sync_rounds(ctx, prune_run_id, out_dir, base_model_id, registered)
    ctx.store.add_artifact("rounds", rounds_file, job_id=ctx.job_id)
    payload = result.to_dict()
    payload.pop("round_details", None)
    payload["resumed_from_round"] = resumed_from
    if result.stopped == "user":
        ctx.stopped(f"stopped after {len(result.rounds)} finished round(s); resume continues from there")
    return payload


def run_score(ctx: JobContext) -> dict[str, Any]:
    """Filter scores and the method's allocation for one pruning step, without cutting:
    what the dashboard draws before a run. ``scores.json`` (per group: scores, kept count,
    the channels that would go) and ``correlations.npz`` (when the criterion uses them)."""
    import numpy as np

    from core.allocation.base import AllocationLimits
    from core.allocation.cost import CostModel
    from core.allocation.scoring_network import ScoringNetworkSettings
    from core.commands.evaluate import index_for_checkpoint
    from core.commands.train import dataset_options
    from core.data.base import parse_size
    from core.data.dataset import SegmentationDataset
    from core.models.checkpoint import load_checkpoint
    from core.pruning.graph import PruningGraph, select_removal
    from core.pruning.loop import calibration_batches
    from core.pruning.methods import resolve_method
    from core.precision import resolve_precision
    from core.pruning.step import StepSettings, allocate, example_input, score_filters
    from core.train import TorchThreads, class_pixel_counts, class_weights_from_counts, resolve_device

    args = parse_params("score", ctx.params)
    device = resolve_device(args.device)
    method = resolve_method(args.method, args.allocator, args.criterion)
    ctx.progress(0.02, "loading the checkpoint and the calibration images")
    loaded = load_checkpoint(args.checkpoint, device=device)
    spec, model = loaded.spec, loaded.model
    index, same_format = index_for_checkpoint(args.checkpoint, spec, args.format, args.root, args.split_seed,
                                              dataset_options(args), strict=getattr(args, "strict", False))
    size = parse_size(args.size, tuple(spec.input_size) if same_format else index.default_size)
    train_ds = SegmentationDataset(index, "train", size, spec.in_channels, augment=False, limit=args.limit)
    names = list(spec.classes)
    settings = StepSettings(beta=args.beta, seed=args.seed, precision=resolve_precision(args.precision, device),
                            scoring=ScoringNetworkSettings(steps=args.scoring_steps, seed=args.seed),
                            limits=AllocationLimits(max_prune_ratio=args.max_prune_ratio, round_to=args.round_to))
    with TorchThreads(args.threads):
        batches = calibration_batches(train_ds, args.calibration_images, args.batch_size, args.seed)
        weights = class_weights_from_counts(class_pixel_counts(train_ds, len(names)))
        ctx.check_stop()
        graph = PruningGraph(model, example_input(model, size, spec.in_channels))
        cost = CostModel(graph)
        ctx.progress(0.1, f"scoring filters ({method.criterion})")
        analysis = score_filters(model, graph, method.criterion, batches, settings)
        ctx.check_stop()

        def relay(fraction: float, message: str) -> bool:
            if ctx.progress(0.2 + 0.75 * fraction, message):
                raise StopRequested()
            return False

        ctx.progress(0.2, f"allocating ({method.allocator})")
        allocation = allocate(model, graph, cost, method.allocator, analysis, batches, args.target, names,
                              weights, settings, progress=relay)
    groups = []
    for g in graph.groups:
        scores = analysis.scores[g.name]
        removed = select_removal(g, scores.tolist(), g.channels - allocation.kept[g.name])
        groups.append({"name": g.name, "index": g.index, "channels": g.channels, "kept": allocation.kept[g.name],
                       "scale": g.scale, "role": g.role, "scores": [float(s) for s in scores],
                       "removed": sorted(int(i) for i in removed)})
    # what the dashboard's live tuning needs to answer any target without rerunning the job:
    # the scoring network's logits, or the sensitivity curves (per-group loss rise per level)
    details = {k: v for k, v in allocation.details.items() if k in ("history", "offset", "logits", "drops", "levels")}
    payload = {"checkpoint": str(Path(args.checkpoint).resolve()), "method": args.method,
               "allocator": method.allocator, "criterion": method.criterion, "target": args.target,
               "input_size": list(size), "calibration_images": sum(int(x.shape[0]) for x, _ in batches),
               "allocation": allocation.to_dict(), "details": details, "groups": groups}
    scores_file = atomic_write_json(ctx.out_dir / "scores.json", payload)
    model_id = _base_model_id(ctx, args.checkpoint)
    ctx.store.add_artifact("scores", scores_file, job_id=ctx.job_id, model_id=model_id)
    if analysis.correlations:
        arrays = {f"group_{i:03d}": np.asarray(analysis.correlations[g.name], dtype=np.float32)
                  for i, g in enumerate(graph.groups) if g.name in analysis.correlations}
        correlations = atomic_write_npz(ctx.out_dir / "correlations.npz", arrays)
        ctx.store.add_artifact("correlations", correlations, job_id=ctx.job_id, model_id=model_id)
    return {"scores": str(scores_file), "groups": len(groups), "predicted": allocation.predicted,
            "budget_met": allocation.budget_met}


def run_export(ctx: JobContext) -> dict[str, Any]:
    """ONNX export (checked against PyTorch) to ``runs/<id>/model.onnx`` and, unless
    ``no_profile``, the profile (params, MACs, size, latency) to ``profile.json``."""
    from core.commands.export_onnx import export_from_args
    from core.models.checkpoint import load_checkpoint
    from core.profile import profile_model

    onnx_file = ctx.out_dir / "model.onnx"
    args = parse_params("export", ctx.params, out=str(onnx_file))
    ctx.progress(0.05, "exporting to ONNX")
    payload = export_from_args(args)
    model_id = _base_model_id(ctx, args.checkpoint)
    ctx.store.add_artifact("onnx", onnx_file, job_id=ctx.job_id, model_id=model_id)
    if not args.no_profile:
        ctx.check_stop()
        ctx.progress(0.4, "profiling (params, MACs, latency)")
        loaded = load_checkpoint(args.checkpoint, device="cpu")
        size = tuple(payload["input_size"])
        profile = profile_model(loaded.model, loaded.spec, checkpoint_dir=loaded.path, runs=args.runs,
                                warmup=args.warmup, threads=args.threads, input_size=size, onnx=True)
        report = atomic_write_json(ctx.out_dir / "profile.json", profile)
        ctx.store.add_artifact("profile", report, job_id=ctx.job_id, model_id=model_id)
        payload["profile"] = {k: profile[k] for k in ("params", "macs", "size_bytes", "latency_ms")}
    return payload


@dataclass(frozen=True)
class JobKind:
    run: Callable[[JobContext], dict[str, Any]]
    description: str


# which kinds can be resumed is `core.runs.store.RESUMABLE_KINDS` (the store refuses the others)
KINDS: dict[str, JobKind] = {
    "train": JobKind(run_train, "train a model from scratch and save a checkpoint"),
    "score": JobKind(run_score, "filter scores and the method's allocation, nothing cut"),
    "prune": JobKind(run_prune, "iterative prune-retrain; resumes after its last finished round"),
    "evaluate": JobKind(run_evaluate, "metrics and per-image table of a checkpoint on a split"),
    "export": JobKind(run_export, "ONNX export checked with ONNX Runtime, and the profile"),
}


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size

