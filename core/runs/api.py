"""What the dashboard (and ``python -m core jobs``) calls: submit, list, show, stop, resume,
and start a worker when none is running. Nothing here runs a job; every call is one or two
short store transactions, safe to make on every rerun of a page. Only `submit` imports the
engine (a request's choices are the engine's registries, which import torch)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from core.runs.jobs import PruneRunState
from core.runs.kinds import KINDS, check_resumable, job_kind
from core.runs.store import RUNS_DIR, JobRecord, Store, StoreError, default_db_path
from core.services.request import ParameterError, Request
from core.runs.worker import _child_env, configured_slots, default_heartbeat_timeout, worker_running

DEFAULT_IDLE_EXIT = 600.0  # a worker started on demand leaves after 10 idle minutes
RESPAWN_BACKOFF = 30.0  # seconds before starting another worker after one crashed
WORKER_LOG = "worker.log"

_stores: dict[Path, Store] = {}
_started: dict[Path, tuple[subprocess.Popen, float]] = {}  # the worker this process last started, and when
_start_lock = threading.Lock()


def open_store(path: str | Path | None = None) -> Store:
    """The store of the workspace (or at ``path``), opened (and migrated) once per process."""
    resolved = Path(path).expanduser().resolve() if path is not None else default_db_path()
    if resolved not in _stores:
        _stores[resolved] = Store(resolved)
    return _stores[resolved]


def _store(store: Store | None) -> Store:
    return store if store is not None else open_store()


def submit(kind: str, params: dict[str, Any] | Request, store: Store | None = None) -> JobRecord:
    """Queue a job after checking its parameters (a request, or its JSON) with its kind's
    request type. A checkpoint path is made absolute, and a job on a checkpoint the store knows
    takes that model's dataset (format, root, split seed, options) unless the parameters name
    one. The job stores the request's JSON; its runner rebuilds the request from it."""
    store = _store(store)
    job = job_kind(kind)
    if isinstance(params, Request) and params.KIND != kind:
        raise ParameterError(f"a {params.KIND} request is not a {kind} job's")
    params = params.to_json() if isinstance(params, Request) else dict(params)
    if job.takes_checkpoint and params.get("checkpoint"):
        params["checkpoint"] = str(Path(params["checkpoint"]).expanduser().resolve())
    if job.takes_dataset and params.get("checkpoint") and not params.get("format"):
        model = store.find_model(params["checkpoint"])
        dataset = store.get_dataset(model["dataset_id"]) if model and model["dataset_id"] else None
        if dataset:
            params["format"] = dataset["format"]
            if dataset["root"]:
                params.setdefault("root", dataset["root"])
            params.setdefault("split_seed", dataset["split_seed"])
            if dataset["options"] and not params.get("option"):  # a request's JSON holds {} when it names none
                params["option"] = dataset["options"]
    request = job.request.from_json(params)
    params = request.to_json()
    dataset_id = None
    if params.get("format"):
        root = params.get("root")
        dataset_id = store.upsert_dataset(params["format"], str(Path(root).expanduser().resolve()) if root else None,
                                          int(params.get("split_seed") or 0), params.get("option") or {})
    job_id = store.create_job(kind, params, dataset_id=dataset_id)
    return store.get_job(job_id)


def list_jobs(store: Store | None = None, states: list[str] | None = None, kind: str | None = None,
              limit: int | None = 100) -> list[JobRecord]:
    """Newest first. A running job whose worker died is marked failed as it is read (once its
    heartbeat is older than the timeout), not shown running with an ETA until a worker starts."""
    store = _store(store)
    _mark_stale(store)
    return store.list_jobs(states=states, kind=kind, limit=limit)


def get_job(job_id: int, store: Store | None = None) -> JobRecord:
    store = _store(store)
    _mark_stale(store)
    return store.get_job(job_id)


def _mark_stale(store: Store) -> None:
    cutoff = time.time() - default_heartbeat_timeout()
    try:
        # a read first: the write (and the worker-lock probe) only when a heartbeat is overdue
        if store.query("SELECT 1 FROM jobs WHERE state = 'running' AND COALESCE(heartbeat_at, started_at, 0) < ? "
                       "LIMIT 1", (cutoff,)):
            recover_stale_jobs(store)
    except StoreError:  # a read-only or full store can still be read: show it as it is
        pass


def job_details(job_id: int, store: Store | None = None) -> dict[str, Any]:
    """The job with its folder, artifacts, and for a kind with rounds (prune) its run and rounds."""
    store = _store(store)
    _mark_stale(store)
    job = store.get_job(job_id)
    details = job.to_dict()
    details["folder"] = str(store.job_dir(job_id))
    details["artifacts"] = store.list_artifacts(job_id)
    kind = KINDS.get(job.kind)  # None: a kind this version does not know (a job from another one)
    if kind is not None and kind.has_rounds:
        details["prune_run"] = store.get_prune_run(job_id)
        details["rounds"] = store.list_rounds(job_id)
    return details


def prune_run(job_id: int, store: Store | None = None) -> PruneRunState:
    """A prune job's starting measurement, its finished rounds and its recovery phase."""
    store = _store(store)
    _mark_stale(store)
    return PruneRunState.of(store, job_id)


def stop(job_id: int, store: Store | None = None) -> JobRecord:
    """A queued job stops at once; a running one within seconds (killed after the grace)."""
    return _store(store).request_stop(job_id)


def resume(job_id: int, store: Store | None = None) -> JobRecord:
    """Queue a failed or stopped prune job again under the same id and folder: it continues
    after its last finished round. Other kinds would start over and overwrite their outputs,
    so they are refused (`JobNotResumableError`): submit a new job instead."""
    store = _store(store)
    check_resumable(store.get_job(job_id))
    return store.requeue(job_id, message="queued again (resume)")


def recover_stale_jobs(store: Store | None = None, heartbeat_timeout: float | None = None) -> list[int]:
    """Mark failed the running jobs whose heartbeat stopped, when no worker is alive to
    supervise them (a live worker does this for its own jobs)."""
    store = _store(store)
    if worker_running(store):
        return []
    timeout = default_heartbeat_timeout() if heartbeat_timeout is None else heartbeat_timeout
    return store.fail_stale_jobs(timeout)


def worker_alive(store: Store | None = None) -> bool:
    """Whether a worker serves the workspace (one non-blocking lock probe: cheap enough for
    every rerun of a page)."""
    return worker_running(_store(store))


def ensure_worker(store: Store | None = None, idle_exit: float | None = DEFAULT_IDLE_EXIT,
                  extra_args: list[str] | None = None) -> int | None:
    """Start ``python -m core worker`` in the background unless one is running; returns the
    new worker's pid (None when one was already running or starting). The worker outlives
    the caller (its own session) and leaves after ``idle_exit`` idle seconds. It has one slot
    unless ``DEFECTPRUNE_WORKER_SLOTS`` asks for more (capped at the machine's GPUs, or cores).

    Safe to call every few seconds (a dashboard fragment does): a worker this process started
    counts as running while it is alive, although it takes a few seconds to import and take
    the workspace lock, so no second one is spawned meanwhile; one that has ended is reaped."""
    store = _store(store)
    with _start_lock:  # Streamlit sessions are threads of one process
        started = _started.get(store.path)
        if started is not None:
            process, when = started
            code = process.poll()
            if code is None or (code != 0 and time.monotonic() - when < RESPAWN_BACKOFF):
                return None  # still starting, or it crashed just now: not one every call (see worker.log)
        if worker_running(store):
            return None
        recover_stale_jobs(store)
        folder = store.workspace / RUNS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "core", "worker", "--db", str(store.path)]
        if idle_exit is not None:
            command += ["--idle-exit", str(idle_exit)]
        command += list(extra_args or [])
        slots = configured_slots()
        if slots > 1 and "--slots" not in command:
            command += ["--slots", str(slots)]
        with open(folder / WORKER_LOG, "ab") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=_child_env(store), start_new_session=True, cwd=os.getcwd())
        _started[store.path] = (process, time.monotonic())
        return process.pid


def list_models(store: Store | None = None) -> list[dict[str, Any]]:
    return _store(store).list_models()


def list_datasets(store: Store | None = None) -> list[dict[str, Any]]:
    return _store(store).list_datasets()


def list_artifacts(job_id: int | None = None, store: Store | None = None) -> list[dict[str, Any]]:
    return _store(store).list_artifacts(job_id)
