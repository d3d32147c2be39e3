"""What the worker runs for each job kind, as a function of a `JobContext`.

Each runner rebuilds its request from the job's JSON (``<Request>.from_json``: the request
type checks it as at submission), points the outputs the job decides itself at the job's
folder (``<workspace>/runs/<job_id>/``), runs the service and records in the store what the
service wrote (models, artifacts, prune rounds). The services are those the command line runs;
only the progress differs: it hands the latest progress to the context, which a heartbeat
thread writes to the store about once a second, and it answers "stop" when the store says a
stop was requested. Which runner belongs to which kind is `core.runs.kinds`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.atomic import file_stamp
from core.errors import DefectPruneError
from core.progress import duration_text, estimate_remaining, remaining_text
from core.runs.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_npz
from core.runs.store import FAILED, QUEUED, RUNNING, STOPPED, SUCCEEDED, JobRecord, Store
from core.services.compare_int8 import Int8CostRequest, run_int8_cost
from core.services.evaluate import EvaluateRequest, run_evaluate
from core.services.export import ExportRequest, run_export
from core.services.import_model import ImportRequest, run_import
from core.services.prune import PruneRequest, run_prune
from core.services.score import ScoreRequest, run_score
from core.services.train import TrainRequest, run_train

if TYPE_CHECKING:
    from core.pruning.loop import RoundRecord, RunBase
    from core.train import Progress

HEARTBEAT_SECONDS = 1.0


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
        self._reported_eta: tuple[float, float] | None = None  # the runner's own ETA, and when
        self.fraction = float(job.progress)  # the latest reported

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def progress(self, fraction: float, message: str, eta_seconds: float | None = None,
                 metrics: dict[str, Any] | None = None) -> bool:
        """Record progress; returns True when the job should stop. Without the runner's own
        ``eta_seconds`` the ETA is this attempt's pace (`estimate_remaining`)."""
        fraction = float(min(max(fraction, 0.0), 1.0))
        now = time.monotonic()
        with self._lock:
            self.fraction = fraction
            if self._start_fraction is None:
                self._start_fraction, self._start = fraction, now
            self._reported_eta = None if eta_seconds is None else (float(eta_seconds), now)
            if metrics:
                self._metrics.update(metrics)
            self._pending = {"progress": fraction, "message": message, "eta_seconds": self._eta(now),
                             "metrics": dict(self._metrics)}
        return self.stop_event.is_set()

    def _eta(self, now: float) -> float | None:
        """Seconds left as of ``now``: the runner's last ETA less the time since it said so,
        else the pace of this attempt (a resumed job starts part-way) up to now."""
        if self._reported_eta is not None:
            eta, at = self._reported_eta
            return max(eta - (now - at), 0.0)
        if self._start_fraction is None:
            return None
        return estimate_remaining(self.fraction, now - self._start, self._start_fraction)

    def take_pending(self) -> dict[str, Any]:
        """What the next heartbeat writes. With no new report since the last one, still the
        ETA as of now: a long phase that reports nothing (a profile, a validation) does not
        leave the page showing the minutes left as they were when it began."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None and self._start_fraction is not None:
                pending = {"progress": self.fraction, "eta_seconds": self._eta(time.monotonic())}
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


# ---------------------------------------------------------------- what the dashboard reads back
@dataclass(frozen=True)
class TrainingProgress:
    """What a train job last reported (`_train_relay` writes it into the job's metrics) and
    the checkpoint it saved: the dashboard reads them here, not by the keys they are stored at."""

    epoch: int | None
    loss: float | None
    val_defect_miou: float | None
    curve: list[dict[str, Any]]  # per finished epoch: epoch, loss, val_defect_miou
    checkpoint: str | None  # once it ended with weights (a stopped job keeps its best so far)
    reported: bool  # it reported progress at all yet

    @classmethod
    def of(cls, job: JobRecord) -> TrainingProgress:
        metrics, result = job.metrics or {}, job.result or {}
        return cls(epoch=metrics.get("epoch"), loss=metrics.get("loss"), val_defect_miou=metrics.get("val_defect_miou"),
                   curve=list(metrics.get("curve") or []), checkpoint=result.get("checkpoint"), reported=bool(metrics))


@dataclass(frozen=True)
class JobTiming:
    """How long a job has run and, when its progress supports one, how long it has left: the
    runner's ETA as the store holds it (`JobContext` keeps it current every heartbeat), else
    (a row written without one) the pace since the job started. ``text`` is what a page shows
    beside the progress bar."""

    elapsed: float | None  # seconds run (queued: None; final: its whole run)
    remaining: float | None  # seconds left; None when nothing honest can be said
    text: str

    @classmethod
    def of(cls, job: JobRecord, now: float | None = None) -> JobTiming:
        now = time.time() if now is None else now
        if job.state == QUEUED:
            return cls(None, None, "waiting for the worker")
        if job.started_at is None:  # stopped before it started
            return cls(None, None, "")
        end = job.finished_at if job.finished and job.finished_at is not None else now
        elapsed = max(end - job.started_at, 0.0)
        if job.finished:
            verb = {SUCCEEDED: "done in", FAILED: "failed after", STOPPED: "stopped after"}.get(job.state, "ran")
            return cls(elapsed, None, f"{verb} {duration_text(elapsed)}")
        ran = f"{duration_text(elapsed)} elapsed"
        if job.state != RUNNING or job.stop_requested:
            return cls(elapsed, None, f"{ran}, stopping" if job.stop_requested else ran)
        if job.eta_seconds is not None:
            # 0: the runner's estimate ran out and the job goes on: nothing honest to add
            remaining = job.eta_seconds if job.eta_seconds > 0 else None
        elif job.attempts <= 1:  # a resumed job started part-way: its pace from 0 would lie
            remaining = estimate_remaining(job.progress, elapsed)
        else:
            remaining = None
        left = remaining_text(remaining)
        return cls(elapsed, remaining, f"{ran}, {left}" if left else ran)


@dataclass(frozen=True)
class PruneRunState:
    """A prune job's run as the store mirrors it (`sync_rounds`), in the loop's own types."""

    base: RunBase | None  # what the starting checkpoint measured before round 1 (None until then)
    rounds: list[RoundRecord]  # the store's rounds, oldest first
    recovery: dict[str, Any] | None  # the recovery phase's record, when one ran
    # the loop's result once it ended (checkpoint, reductions, val drop, "test": the test
    # split's metrics or None, "test_skipped" when a stop left it out); None before
    result: dict[str, Any] | None = None

    @classmethod
    def of(cls, store: Store, job_id: int) -> PruneRunState:
        from core.pruning.loop import RunBase

        run = store.get_prune_run(job_id) or {}
        stored = run.get("result") or {}
        result = {k: v for k, v in stored.items() if k != "recovery"}
        base = RunBase.from_dict(run["base"]) if run.get("base") else None
        return cls(base=base, rounds=[stored_round(r) for r in store.list_rounds(job_id)],
                   recovery=stored.get("recovery"), result=result or None)

    @property
    def kept(self) -> list[RoundRecord]:
        """The rounds within the tolerance, oldest first (the others were reverted)."""
        return [r for r in self.rounds if r.accepted]

    def best_kept(self) -> tuple[str | None, str]:
        """The run's model to compare with its start, and which it is, in words: the result it
        recommends once it ended (the recovered checkpoint after a recovery phase), else its
        last kept round (None: no such model)."""
        kept = self.kept
        result = self.result or {}
        if result.get("checkpoint"):
            path = result["checkpoint"]
            if self.recovery and _same_path(self.recovery.get("checkpoint") or "", path):
                return path, f"its result (round {self.recovery['from_round']} after its recovery phase)"
            rounds = [r.round for r in kept if _same_path(r.checkpoint, path)]
            return path, f"its result (round {rounds[0]})" if rounds else "its result"
        if result:
            return None, "no kept round (its result is the unpruned model)"
        if kept:
            return kept[-1].checkpoint, f"its last kept round so far (round {kept[-1].round})"
        return None, "no kept round yet"


def stored_round(row: dict[str, Any]) -> RoundRecord:
    """A round as the store holds it (`Store.list_rounds`): its columns (the checkpoint's path
    made absolute) over the loop's record; what neither holds takes the record's default
    (``val``: {})."""
    from core.pruning.loop import RoundRecord

    fields = RoundRecord.__dataclass_fields__
    record = {k: v for k, v in (row.get("record") or {}).items() if k in fields}
    columns = {k: v for k, v in row.items() if k in fields}
    return RoundRecord(**{"val": {}, **record, **columns})


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


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


# ---------------------------------------------------------------- job kinds
def train_job(ctx: JobContext) -> dict[str, Any]:
    """Train from scratch; the checkpoint goes to ``runs/<id>/checkpoint``."""
    request = TrainRequest.from_json(ctx.params, out=str(ctx.out_dir / "checkpoint"))
    if request.encoder_weights:  # a file a job reads lies in the workspace or a data root
        from core.config import confine_to_data_roots, data_roots

        weights = confine_to_data_roots(request.encoder_weights, roots=[ctx.store.workspace, *data_roots()])
        request = replace(request, encoder_weights=str(weights))
    result = run_train(request, progress=_train_relay(ctx))
    model_id = _register_checkpoint(ctx, result.checkpoint)
    if result.history_file.is_file():
        ctx.store.add_artifact("training-history", result.history_file, job_id=ctx.job_id, model_id=model_id)
    payload = {**result.to_json(), "model_id": model_id}
    if result.stopped_by_user:
        ctx.stopped(f"stopped after {result.epochs_run} epoch(s); the best weights so far were saved")
    return payload


def evaluate_job(ctx: JobContext) -> dict[str, Any]:
    """Metrics of a checkpoint on a split; ``evaluation.json`` and ``per_image.csv``."""
    request = EvaluateRequest.from_json(ctx.params)
    result = run_evaluate(request, progress=_train_relay(ctx))
    payload = result.to_json()
    csv = atomic_write_bytes(ctx.out_dir / "per_image.csv",
                             result.evaluation.per_image.to_csv(index=False).encode("utf-8"))
    report = atomic_write_json(ctx.out_dir / "evaluation.json", payload)
    model_id = _base_model_id(ctx, request.checkpoint)
    ctx.store.add_artifact("per-image", csv, job_id=ctx.job_id, model_id=model_id)
    ctx.store.add_artifact("evaluation", report, job_id=ctx.job_id, model_id=model_id)
    ctx.progress(1.0, f"{payload['split']}: defect mIoU {payload.get('defect_miou')}",
                 metrics={"defect_miou": payload.get("defect_miou")})
    return payload


def prune_job(ctx: JobContext) -> dict[str, Any]:
    """The prune-retrain loop in ``runs/<id>/prune``; run again (resume) it continues after
    the last finished round. Rounds are mirrored into the store as they finish."""
    from core.pruning.loop import ROUNDS_FILE
    from core.train import StopRequested

    from core.config import confine_to_data_roots, data_roots

    out_dir = ctx.out_dir / "prune"
    request = PruneRequest.from_json(ctx.params, out=str(out_dir))
    if request.allocation:  # a file a job reads lies in the workspace or a data root, as the pages' typed paths
        allocation = confine_to_data_roots(request.allocation, roots=[ctx.store.workspace, *data_roots()])
        request = replace(request, allocation=str(allocation))
    base_model_id = _base_model_id(ctx, request.checkpoint)
    prune_run_id = ctx.store.upsert_prune_run(ctx.job_id, request.checkpoint, out_dir, request.method, ctx.params,
                                              base_model_id=base_model_id)
    registered = {r["round"]: r["model_id"] for r in ctx.store.list_rounds(ctx.job_id) if r["model_id"]}
    resumed_from = sync_rounds(ctx, prune_run_id, out_dir, base_model_id, registered)
    rounds_file = out_dir / ROUNDS_FILE
    seen = {"stamp": file_stamp(rounds_file)}

    def progress(fraction: float, message: str) -> bool:
        stamp = file_stamp(rounds_file)
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
    result = run_prune(request, progress=progress)
    sync_rounds(ctx, prune_run_id, out_dir, base_model_id, registered)
    ctx.store.add_artifact("rounds", rounds_file, job_id=ctx.job_id)
    payload = result.to_dict()
    payload.pop("round_details", None)
    payload["resumed_from_round"] = resumed_from
    if result.stopped == "user":
        ctx.stopped(f"stopped after {len(result.rounds)} finished round(s); resume continues from there")
    return payload


def score_job(ctx: JobContext) -> dict[str, Any]:
    """Filter scores and the method's allocation for one step, nothing cut (`run_score`):
    ``scores.json`` and, when the criterion measures them, ``correlations.npz``."""
    request = ScoreRequest.from_json(ctx.params)
    result = run_score(request, ctx.progress)
    scores_file = atomic_write_json(ctx.out_dir / "scores.json", result.to_json())
    model_id = _base_model_id(ctx, request.checkpoint)
    ctx.store.add_artifact("scores", scores_file, job_id=ctx.job_id, model_id=model_id)
    if result.correlations:
        correlations = atomic_write_npz(ctx.out_dir / "correlations.npz", result.correlations)
        ctx.store.add_artifact("correlations", correlations, job_id=ctx.job_id, model_id=model_id)
    return {"scores": str(scores_file), **result.summary()}


def export_job(ctx: JobContext) -> dict[str, Any]:
    """ONNX export (checked against PyTorch) to ``runs/<id>/model.onnx`` and, unless
    ``no_profile``, the profile (params, MACs, size, latency) to ``profile.json``."""
    onnx_file = ctx.out_dir / "model.onnx"
    request = ExportRequest.from_json(ctx.params, out=str(onnx_file))
    result = run_export(request, ctx.progress)
    model_id = _base_model_id(ctx, request.checkpoint)
    ctx.store.add_artifact("onnx", onnx_file, job_id=ctx.job_id, model_id=model_id)
    if result.profile is not None:
        report = atomic_write_json(ctx.out_dir / "profile.json", result.profile)
        ctx.store.add_artifact("profile", report, job_id=ctx.job_id, model_id=model_id)
    return result.to_json()


def int8_cost_job(ctx: JobContext) -> dict[str, Any]:
    """The Compare page's INT8 step (`run_int8_cost`): both models' fp32 and INT8 ONNX files
    timed in turns and scored with ONNX Runtime; the numbers also in ``int8_cost.json``."""
    result = run_int8_cost(Int8CostRequest.from_json(ctx.params), ctx.progress)
    report = atomic_write_json(ctx.out_dir / "int8_cost.json", result)
    ctx.store.add_artifact("int8_cost", report, job_id=ctx.job_id)
    return result


def import_job(ctx: JobContext) -> dict[str, Any]:
    """A model trained elsewhere as the checkpoint ``runs/<id>/checkpoint``, evaluated at once
    on its dataset and registered as a model. The source is read only inside the workspace
    (where the pages keep uploads) or a data root, as the pages' typed paths."""
    from core.config import confine_to_data_roots, data_roots

    request = ImportRequest.from_json(ctx.params, out=str(ctx.out_dir / "checkpoint"))
    source = confine_to_data_roots(request.source, roots=[ctx.store.workspace, *data_roots()])
    result = run_import(replace(request, source=str(source)), progress=_train_relay(ctx, "evaluating the import: "))
    model_id = _register_checkpoint(ctx, result.checkpoint)
    evaluation = result.evaluation or {}
    ctx.progress(1.0, f"imported {result.arch}-{result.encoder}"
                 + (f"; {evaluation['split']} defect mIoU {evaluation.get('defect_miou')}" if evaluation else ""),
                 metrics={"defect_miou": evaluation.get("defect_miou")} if evaluation else None)
    return {**result.to_json(), "model_id": model_id}


