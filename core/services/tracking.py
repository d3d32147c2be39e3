"""Experiment tracking with MLflow. Where ``DEFECTPRUNE_MLFLOW_URI`` or a request's
``mlflow_uri`` (``--mlflow-uri``; a job carries it in its parameters) names a tracking server
or store, every train, prune and export service call is one MLflow run: its parameters (the
request's fields), its metrics (per epoch for training: train loss and val defect mIoU; per
round for pruning, each round also a nested child run), its artifacts (the checkpoint folder,
the ONNX file, ``report/rounds.json``) and ``report/result.json``.

`tracked` wraps the services' ``run_*(request, progress)``: it wraps their progress callback
and reads their results, nothing inside training or the loop. Without a URI it calls the
service as it is and MLflow is never imported.

Tracking never breaks a job: its first failure (an unreachable server, an MLflow error, MLflow
not installed) is one ``warning:`` line on stderr (a job's log) and tracking is off for the rest
of that job, which goes on. HTTP calls are kept short (two retries, ten seconds) unless the
operator sets MLflow's own ``MLFLOW_HTTP_REQUEST_*`` variables.

Decided: the tracking URI is server configuration, set by the operator (the environment of the
dashboard and its worker, or the operator's own command line and ``jobs submit``); no page
offers it, so it is not a user-typed path and a ``file:`` store is not confined to the data
roots (`core.config.confine_to_data_roots` is for paths the dashboard's users type). MLflow 3
refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set: a ``file:`` URI (or a plain
folder) here sets it for the job's process, since naming one is the operator asking for it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.atomic import file_stamp
from core.errors import DefectPruneError
from core.services.request import setting

ENV_URI = "DEFECTPRUNE_MLFLOW_URI"
ENV_EXPERIMENT = "DEFECTPRUNE_MLFLOW_EXPERIMENT"
DEFAULT_EXPERIMENT = "defectprune"
KIND_TAG, OUT_TAG, ROUND_TAG = "defectprune.kind", "defectprune.out", "defectprune.round"
PARENT_TAG, NAME_TAG = "mlflow.parentRunId", "mlflow.runName"
RECOVERY = "recovery"  # the ROUND_TAG of the prune run's recovery phase
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(DefectPruneError):
    """A file tracking reads (a checkpoint's training history) is not what it should be:
    caught, the history's metrics are then not logged."""


def tracking_setting() -> Any:
    """The ``mlflow_uri`` field of a tracked request (``--mlflow-uri``)."""
    return setting(None, metavar="URI",
                   help=f"MLflow tracking URI to log this run to: parameters, metrics, artifacts (default: ${ENV_URI}; "
                        "neither set: no tracking)")


def tracking_uri(request: Any) -> str | None:
    """The URI a request's run logs to (its own, else the environment's), None for none."""
    uri = getattr(request, "mlflow_uri", None) or os.environ.get(ENV_URI, "")
    return uri.strip() or None


def tracked(service: Callable[..., Any]) -> Callable[..., Any]:
    """``run_*(request, progress)`` logged to MLflow when `tracking_uri` names a store."""

    @functools.wraps(service)
    def run(request: Any, progress: Any = None) -> Any:
        uri = tracking_uri(request)
        # under torchrun only the first process logs: one MLflow run per job, not per rank
        if uri is None or os.environ.get("RANK", "0") != "0":
            return service(request, progress)
        tracker = Tracker.start(uri, request, _run_name(request))
        job = _JOBS[request.KIND](tracker, request)
        try:
            result = service(request, job.progress(progress))
        except BaseException as exc:
            tracker._guard("ending the failed run", job.failed, exc)
            tracker.abandon()
            raise
        tracker._guard("logging the results", job.finish, result)
        tracker.abandon()
        return result

    return run


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Tracker:
    """One MLflow run through `mlflow.tracking.MlflowClient`. Every call after the first
    failure does nothing (that failure was one warning line)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.client: Any = None
        self.experiment_id = ""
        self.run_id = ""
        self.resumed = False
        self.logged_metrics: set[str] = set()  # a resumed run's
        self.off = False

    @classmethod
    def start(cls, uri: str, request: Any, name: str) -> "Tracker":
        tracker = cls(request.KIND)
        tracker._guard("starting the run", tracker._start, uri, request, name)
        return tracker

    def _start(self, uri: str, request: Any, name: str) -> None:
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if _is_file_store(uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get(ENV_EXPERIMENT, "").strip() or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        out = _resolved(getattr(request, "out", None))
        earlier = self._unfinished_run(out) if self.kind == "prune" and out else None
        if earlier is not None:  # a stopped or failed prune resumed: the same job, the same run
            self.run_id, self.resumed = earlier.info.run_id, True
            self.logged_metrics = set(earlier.data.metrics)
            self.client.update_run(self.run_id, status="RUNNING")
            logged = set(earlier.data.params)
        else:
            tags = {NAME_TAG: name, KIND_TAG: self.kind, "mlflow.source.name": "defectprune"}
            if out:
                tags[OUT_TAG] = out
            self.run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
            logged = set()
        self._log_batch(self.run_id, params={k: v for k, v in request_params(request).items() if k not in logged})

    def _unfinished_run(self, out: str) -> Any:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{OUT_TAG}` = '{_quoted(out)}' and tags.`{KIND_TAG}` = 'prune'",
            max_results=5, order_by=["attributes.start_time DESC"])
        return next((r for r in runs if r.info.status != "FINISHED" and PARENT_TAG not in r.data.tags), None)

    def _guard(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        if self.off:
            return None
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - tracking must never break the job
            self.off = True
            text = " ".join(str(exc).split())[:300] or type(exc).__name__
            if isinstance(exc, ImportError):
                text = f"MLflow is not installed ({text}; pip install -r requirements.txt)"
            warn(f"experiment tracking is off for the rest of this {self.kind} run: {what} failed: {text}")
            return None

    def _log_batch(self, run_id: str, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
                   step: int = 0) -> None:
        import time

        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        entries: list[Any] = [Param(_key(k), v) for k, v in (params or {}).items()]
        entries += [Metric(_key(k), v, now, step) for k, v in (metrics or {}).items()]
        for start in range(0, len(entries), 100):  # MLflow's batch limit
            chunk = entries[start:start + 100]
            self.client.log_batch(run_id, params=[e for e in chunk if isinstance(e, Param)],
                                  metrics=[e for e in chunk if isinstance(e, Metric)])

    # the calls a job makes: each guarded
    def metrics(self, values: dict[str, Any], step: int = 0, run_id: str | None = None) -> None:
        clean = numbers(values)
        if clean:
            self._guard("logging metrics", lambda: self._log_batch(run_id or self.run_id, metrics=clean, step=step))

    def child(self, name: str, tag: str, params: dict[str, Any], metrics: dict[str, Any]) -> None:
        """A nested run under this one (a prune round), logged and closed at once."""

        def log() -> None:
            child = self.client.create_run(self.experiment_id, tags={
                NAME_TAG: name, PARENT_TAG: self.run_id, KIND_TAG: f"{self.kind}-{tag if tag == RECOVERY else 'round'}",
                ROUND_TAG: tag})
            self._log_batch(child.info.run_id, params={k: _text(v) for k, v in params.items() if v is not None},
                            metrics=numbers(metrics))
            self.client.set_terminated(child.info.run_id, "FINISHED")

        self._guard(f"logging {name}", log)

    def children(self) -> set[str]:
        """The ROUND_TAGs of the nested runs already logged (a resumed run's)."""

        def read() -> set[str]:
            runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'",
                                           max_results=1000)
            return {r.data.tags.get(ROUND_TAG, "") for r in runs}

        return (self._guard("reading the logged rounds", read) or set()) if self.resumed else set()

    def artifact(self, path: str | Path | None, folder: str | None = None) -> None:
        if self.off or path is None or not Path(path).exists():
            return
        path = Path(path)
        self._guard(f"logging {path.name}", lambda: (self.client.log_artifacts if path.is_dir() else
                                                     self.client.log_artifact)(self.run_id, str(path), folder))

    def document(self, payload: dict[str, Any], name: str) -> None:
        text = json.loads(json.dumps(payload, default=str))
        self._guard(f"logging {name}", lambda: self.client.log_dict(self.run_id, text, name))

    def end(self, status: str) -> None:
        self._guard("ending the run", lambda: self.client.set_terminated(self.run_id, status))

    def abandon(self) -> None:
        """After a failure midway, one quiet try to mark the run FAILED (not left RUNNING)."""
        if self.off and self.run_id:
            try:
                self.client.set_terminated(self.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - its failure was the one warning already
                pass


# ---------------------------------------------------------------- what each kind logs
class _Job:
    def __init__(self, tracker: Tracker, request: Any):
        self.tracker, self.request = tracker, request

    def progress(self, progress: Any) -> Any:
        return progress

    def finish(self, result: Any) -> None:
        self.tracker.document(result.to_json(), "report/result.json")
        self.tracker.end(self.status(result))

    def status(self, result: Any) -> str:
        return "FINISHED"

    def failed(self, exc: BaseException) -> None:
        self.tracker.end("KILLED" if type(exc).__name__ in ("StopRequested", "KeyboardInterrupt") else "FAILED")


class _TrainJob(_Job):
    LIVE = {"train_loss", "val_defect_miou"}  # logged as each epoch ends; the rest from the history

    def progress(self, progress: Any) -> Any:
        tracker = self.tracker

        def relay(report: Any) -> Any:
            if report.phase == "epoch":
                tracker.metrics({"train_loss": report.loss, "val_defect_miou": report.metric}, step=report.epoch)
            return progress(report) if progress is not None else None

        return relay

    def finish(self, result: Any) -> None:
        tracker = self.tracker
        history = _read_json(result.history_file) or {}
        for record in history.get("history", []):
            tracker.metrics({k: v for k, v in record.items() if k not in self.LIVE and k != "epoch"},
                            step=int(record.get("epoch", 0)))
        tracker.metrics({**split_metrics("best_val", result.val), "epochs_run": result.epochs_run,
                         "best_epoch": result.best_epoch, "seconds": result.seconds,
                         "seconds_per_epoch": result.seconds_per_epoch})
        tracker.artifact(result.checkpoint, "checkpoint")
        super().finish(result)

    def status(self, result: Any) -> str:
        return "KILLED" if result.stopped_by_user else "FINISHED"


class _PruneJob(_Job):
    ROUND_METRICS = ("macs", "params", "macs_reduction", "params_reduction", "defect_miou", "drop", "latency_ms",
                     "wall_s")

    def __init__(self, tracker: Tracker, request: Any):
        super().__init__(tracker, request)
        self.out = Path(request.out or ".")  # without one run_prune refuses the request at once
        self.logged = tracker.children() | ({"base"} if "base_macs" in tracker.logged_metrics else set())
        self.stamp: tuple[int, int] | None = None

    def progress(self, progress: Any) -> Any:
        def relay(fraction: float, message: str) -> Any:
            stamp = None if self.tracker.off else file_stamp(self.out / "rounds.json")
            if stamp != self.stamp:  # a round finished (rounds.json is rewritten atomically)
                self.stamp = stamp
                self.tracker._guard("logging the rounds", self.sync)
            return progress(fraction, message) if progress is not None else None

        return relay

    def sync(self) -> None:
        """Log the rounds (and the recovery) in rounds.json not logged yet."""
        if self.tracker.off:
            return
        from core.pruning.loop import read_state

        state = self.tracker._guard("reading rounds.json", read_state, self.out) or {}
        base = state.get("base") or {}
        if "base" not in self.logged and base:
            self.tracker.metrics({"base_macs": base.get("macs"), "base_params": base.get("params"),
                                  "base_val_defect_miou": base.get("defect_miou"),
                                  "base_latency_ms": base.get("latency_ms")})
            self.logged.add("base")
        for record in state.get("rounds", []):
            tag = str(record["round"])
            if tag in self.logged:
                continue
            metrics = {("val_defect_miou" if k == "defect_miou" else k): record.get(k) for k in self.ROUND_METRICS}
            metrics["accepted"] = record.get("accepted", True)
            self.tracker.child(f"round {tag}", tag, {"precision": record.get("precision") or None,
                                                    "distill_weight": record.get("distill_weight"),
                                                    "checkpoint": record.get("checkpoint")}, metrics)
            self.tracker.metrics(metrics, step=int(record["round"]))  # the parent's per-round curves
            self.logged.add(tag)
        recovery = state.get("recovery")
        if recovery and RECOVERY not in self.logged:
            self.tracker.child(RECOVERY, RECOVERY, {k: recovery.get(k) for k in ("from_round", "epochs", "lr",
                                                                                 "distill_weight", "checkpoint")},
                               {("val_defect_miou" if k == "defect_miou" else k): v for k, v in recovery.items()})
            self.logged.add(RECOVERY)

    def finish(self, result: Any) -> None:
        self.sync()
        res = result.result
        self.tracker.metrics({"result_macs_reduction": res.get("macs_reduction"),
                              "result_params_reduction": res.get("params_reduction"),
                              "result_val_defect_miou": res.get("defect_miou"), "result_drop": res.get("drop"),
                              **split_metrics("result_test", res.get("test")), "rounds": len(result.rounds)})
        self.tracker.artifact(self.out / "rounds.json", "report")
        self.tracker.artifact(res.get("checkpoint"), "checkpoint")
        self.tracker.document(result.to_dict(), "report/result.json")
        self.tracker.end("KILLED" if result.stopped == "user" else "FINISHED")

    def failed(self, exc: BaseException) -> None:
        self.sync()  # the rounds that finished before it
        self.tracker.artifact(self.out / "rounds.json", "report")
        super().failed(exc)


class _ExportJob(_Job):
    def finish(self, result: Any) -> None:
        metrics: dict[str, Any] = {"max_abs_diff": result.max_abs_diff, "size_bytes": result.size_bytes}
        profile = result.profile or {}
        metrics.update({k: profile.get(k) for k in ("params", "macs")})
        for engine, ms in (profile.get("latency_ms") or {}).items():
            metrics[f"latency_ms_{engine}"] = ms
        int8 = result.int8 or {}
        metrics["fp32_size_bytes"] = int8.get("fp32_size_bytes")
        for engine, miou in (int8.get("defect_miou") or {}).items():
            metrics[f"test_defect_miou_{engine}"] = miou
        metrics["int8_speedup"] = int8.get("speedup")
        self.tracker.metrics(metrics)
        self.tracker.artifact(result.path, "onnx")
        super().finish(result)


_JOBS: dict[str, type[_Job]] = {"train": _TrainJob, "prune": _PruneJob, "export": _ExportJob}


# ---------------------------------------------------------------- helpers
def request_params(request: Any) -> dict[str, str]:
    """The request's fields as MLflow parameters (text), but the tracking URI itself (it can
    hold a server's credentials) and those left unset (None)."""
    out: dict[str, str] = {}
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if field.name == "mlflow_uri" or value is None:
            continue
        out[field.name] = _text(value)
    return out


def split_metrics(prefix: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """A split's metrics (``defect_miou``, ``per_class_iou``, ...) as flat metric names."""
    flat: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            flat.update({f"{prefix}_{key}_{name}": v for name, v in value.items()})
        else:
            flat[f"{prefix}_{key}"] = value
    return flat


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among ``values`` (booleans as 0/1); nested dicts flattened."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(numbers({f"{key}_{k}": v for k, v in value.items()}))
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list, dict)):
        value = json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True, default=str)
    return str(value)[:MAX_PARAM_CHARS]


def _key(name: str) -> str:
    """A metric or parameter name MLflow takes (letters, digits, ``_-. /:``)."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)[:250]


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _is_file_store(uri: str) -> bool:
    scheme = uri.split(":", 1)[0] if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    return scheme in ("", "file") or len(scheme) == 1  # a plain folder (C:\ on Windows too)


def _resolved(path: str | None) -> str:
    return str(Path(path).resolve()) if path else ""


def _read_json(path: Path) -> Any:
    from core import safe_json

    try:
        return safe_json.read(path, error=TrackingError) if path.is_file() else None
    except TrackingError:
        return None


def _run_name(request: Any) -> str:
    if request.KIND == "train":
        return f"train {request.arch}-{request.encoder}"
    if request.KIND == "prune":
        return f"prune {request.method}"
    return "export int8" if getattr(request, "int8", False) else "export onnx"
