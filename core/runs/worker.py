"""The worker: runs queued jobs, each in its own process, one at a time by default.

``python -m core worker`` polls the store for queued jobs (oldest first) and starts each as
``python -m core worker --run-job ID`` in a new process group, so that killing a job after
its stop grace, or a job crashing, touches nothing else. Only one worker runs per workspace
(an exclusive lock on ``runs/worker.lock``, released by the kernel even on SIGKILL).

The job process writes its own heartbeat every second. When the worker is killed, the job
process notices (its parent changed) and ends too; the job row then keeps its old heartbeat,
and the next worker to start (or `ensure_worker`) marks it failed with the time it stopped.
Everything the job finished before (each prune round's checkpoint and ``rounds.json``) was
written atomically and is intact, and ``jobs resume`` continues from there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from core.atomic import disk_full_message
from core.errors import DefectPruneError
from core.runs.store import (
    FAILED, RUNNING, RUNS_DIR, STOPPED, SUCCEEDED, JobRecord, Store, StoreError, retry_advice,
)

DEFAULT_HEARTBEAT_TIMEOUT = 30.0
DEFAULT_STOP_GRACE = 10.0
DEFAULT_POLL = 0.5
MAX_STORE_BACKOFF = 10.0  # longest pause between retries while the run store fails
STORE_FAILURES = (StoreError, sqlite3.OperationalError)  # a locked or full run store
LOCK_FILE = "worker.lock"
LOG_FILE = "job.log"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def default_heartbeat_timeout() -> float:
    """Seconds without a heartbeat after which a running job counts as dead
    (``DEFECTPRUNE_HEARTBEAT_TIMEOUT``)."""
    return _env_float("DEFECTPRUNE_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT)


def default_stop_grace() -> float:
    """Seconds a job has to honour a stop before it is killed (``DEFECTPRUNE_STOP_GRACE``)."""
    return _env_float("DEFECTPRUNE_STOP_GRACE", DEFAULT_STOP_GRACE)


@dataclass
class WorkerSettings:
    poll_seconds: float = DEFAULT_POLL
    heartbeat_timeout: float | None = None  # None: default_heartbeat_timeout()
    stop_grace: float | None = None  # None: default_stop_grace()
    concurrency: int = 1  # jobs at once (the machine has 2 cores: one training job uses them)
    idle_exit: float | None = None  # leave after this long without work (None: never)
    max_jobs: int | None = None  # leave after this many jobs (tests, batch use)

    def __post_init__(self) -> None:
        if self.heartbeat_timeout is None:
            self.heartbeat_timeout = default_heartbeat_timeout()
        if self.stop_grace is None:
            self.stop_grace = default_stop_grace()
        if self.concurrency < 1:
            raise DefectPruneError(f"concurrency must be at least 1, not {self.concurrency}")


# ---------------------------------------------------------------- the single-worker lock
class WorkerLock:
    """An exclusive, non-blocking flock on ``runs/worker.lock``: one worker per workspace."""

    def __init__(self, store: Store):
        self.path = store.workspace / RUNS_DIR / LOCK_FILE
        self.handle: IO[str] | None = None

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, retrying for ``wait`` seconds (a probe by `worker_running` holds it
        for an instant, which must not turn a starting worker away)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    handle.close()
                    return False
                time.sleep(0.1)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def worker_running(store: Store) -> bool:
    """Whether a worker holds this workspace's lock (alive, whatever its heartbeat says)."""
    lock = WorkerLock(store)
    if lock.acquire():
        lock.release()
        return False
    return True


# ---------------------------------------------------------------- job processes
@dataclass
class _Child:
    job_id: int
    kind: str
    process: subprocess.Popen
    log: Path
    killed: bool = False


def _child_env(store: Store) -> dict[str, str]:
    env = dict(os.environ)
    env["DEFECTPRUNE_WORKSPACE"] = str(store.workspace)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def spawn_job_process(store: Store, job_id: int, kind: str) -> _Child:
    folder = store.job_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / LOG_FILE
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "core", "worker", "--db", str(store.path), "--run-job", str(job_id),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=_child_env(store),
            start_new_session=True,  # its own process group: a kill reaches its data loaders too
        )
    return _Child(job_id, kind, process, log)


def _kill(child: _Child) -> None:
    try:
        os.killpg(child.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.process.wait()
    child.killed = True


def _killed_message(grace: float) -> str:
    return f"stopped: the job did not stop within the {grace:g} s grace and was killed"


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _record_exit(store: Store, child: _Child, code: int) -> None:
    """The job process ended without recording its end (a crash, a kill): say why."""
    job = store.get_job(child.job_id)
    if job.state != RUNNING:
        return
    if job.stop_requested:
        store.finish_job(child.job_id, STOPPED, message="stopped")
        return
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        reason = (f"the job process was killed by {name} (out of memory, or killed by hand); "
                  f"finished work is kept, see {child.log}")
    else:
        last = _last_line(child.log)
        reason = f"the job process exited with code {code} without recording a result" + (f": {last}" if last else "")
    store.finish_job(child.job_id, FAILED, message="failed", error=reason)


# ---------------------------------------------------------------- the loop
def run_worker(store: Store, settings: WorkerSettings | None = None, log: IO[str] | None = None) -> int:
    """Run queued jobs until told to stop (SIGTERM/SIGINT), idle for ``idle_exit`` or done
    ``max_jobs``. Returns 0; 0 too when another worker already serves the workspace."""
    settings = settings or WorkerSettings()
    out = log or sys.stderr

    def say(text: str) -> None:
        print(f"[worker {os.getpid()}] {text}", file=out, flush=True)

    lock = WorkerLock(store)
    if not lock.acquire(wait=1.0):
        say(f"another worker already runs jobs for {store.workspace}; leaving")
        return 0
    worker_id = store.register_worker(os.getpid(), socket.gethostname())
    shutting_down = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        shutting_down["flag"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    children: dict[int, _Child] = {}
    done = 0
    try:
        for job_id in store.fail_stale_jobs(settings.heartbeat_timeout):
            say(f"job {job_id}: marked failed, its heartbeat stopped (the previous worker died)")
        idle_since = last_sweep = last_beat = time.monotonic()
        store_failures = 0
        while True:
            try:
                now = time.monotonic()
                # supervise the running jobs
                for job_id, child in list(children.items()):
                    code = child.process.poll()
                    if code is None:
                        job = store.get_job(job_id)
                        if shutting_down["flag"] and not job.stop_requested:
                            store.request_stop(job_id)
                            continue
                        if job.stop_requested or job.state != RUNNING:
                            asked = job.stop_requested_at or time.time()
                            if time.time() - asked > settings.stop_grace:
                                _kill(child)
                                store.finish_job(job_id, STOPPED, message=_killed_message(settings.stop_grace))
                                say(f"job {job_id}: killed after the stop grace")
                            else:
                                continue
                        else:
                            continue
                        code = child.process.returncode
                    _record_exit(store, child, code)
                    say(f"job {job_id}: {store.get_job(job_id).state} (exit code {code})")
                    del children[job_id]
                    done += 1
                if shutting_down["flag"] and not children:
                    break
                limit_reached = settings.max_jobs is not None and done + len(children) >= settings.max_jobs
                while not shutting_down["flag"] and not limit_reached and len(children) < settings.concurrency:
                    job = store.claim_next_job(os.getpid())
                    if job is None:
                        break
                    try:
                        children[job.id] = spawn_job_process(store, job.id, job.kind)
                    except OSError as exc:
                        store.finish_job(job.id, FAILED, message="failed", error=f"cannot start the job process: {exc}")
                        continue
                    store.set_job_pid(job.id, children[job.id].process.pid)
                    say(f"job {job.id} ({job.kind}): started, pid {children[job.id].process.pid}")
                    limit_reached = settings.max_jobs is not None and done + len(children) >= settings.max_jobs
                if not children:
                    if limit_reached:
                        break
                    if settings.idle_exit is not None and now - idle_since > settings.idle_exit:
                        say(f"idle for {settings.idle_exit:g} s; leaving")
                        break
                else:
                    idle_since = now
                if now - last_beat >= 1.0:
                    store.worker_heartbeat(worker_id, "running" if children else "idle")
                    last_beat = now
                if now - last_sweep >= max(settings.heartbeat_timeout / 3, 1.0):
                    for job_id in store.fail_stale_jobs(settings.heartbeat_timeout, exclude=list(children)):
                        say(f"job {job_id}: marked failed, no heartbeat for {settings.heartbeat_timeout:g} s")
                    last_sweep = now
                store_failures = 0
            except STORE_FAILURES as exc:
                if shutting_down["flag"]:  # the stop requests cannot go through the store
                    say(f"the run store failed ({exc}) while shutting down; stopping {len(children)} job(s) by signal")
                    _stop_without_store(store, children, settings.stop_grace, say)
                    break
                # a locked or full store: the jobs run on (they keep their own heartbeat), the
                # loop tries again, more slowly each time; every step above can be repeated
                store_failures += 1
                pause = min(MAX_STORE_BACKOFF, max(settings.poll_seconds, DEFAULT_POLL) * 2 ** (store_failures - 1))
                say(f"the run store failed ({exc}); {len(children)} running job(s) go on; retrying in {pause:g} s")
                time.sleep(pause)
                continue
            time.sleep(settings.poll_seconds)
    finally:
        for job_id, child in children.items():  # only on an error in the loop itself
            _kill(child)
            _try(say, store.finish_job, job_id, FAILED, message="failed",
                 error=f"the worker stopped with an error while the job ran; {retry_advice(child.kind, job_id)}")
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        try:
            _try(say, store.worker_stopped, worker_id)
        finally:
            lock.release()
    return 0


def _try(say: Callable[[str], None], store_call: Callable[..., object], *args: object, **kwargs: object) -> None:
    """A store call whose failure is said, not raised (a job whose end is not recorded keeps
    its old heartbeat, and the next worker marks it failed)."""
    try:
        store_call(*args, **kwargs)
    except STORE_FAILURES as exc:
        say(f"the run store failed ({exc}) in {getattr(store_call, '__name__', 'a call')}; left unrecorded")


def _stop_without_store(store: Store, children: dict[int, _Child], grace: float,
                        say: Callable[[str], None]) -> None:
    """Shut down while the run store fails: ask each job to stop with SIGINT (a job ends as
    after a stop request: training keeps its best weights, prune its finished rounds), kill
    the jobs still running after the grace, and record each end as far as the store lets."""
    for child in children.values():
        if child.process.poll() is None:
            try:
                child.process.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for job_id, child in list(children.items()):
        try:
            code = child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(child)
            say(f"job {job_id}: killed after the stop grace")
            _try(say, store.finish_job, job_id, STOPPED, message=_killed_message(grace))
        else:
            say(f"job {job_id}: ended (exit code {code})")
            _try(say, _record_exit, store, child, code)
        del children[job_id]


# ---------------------------------------------------------------- inside the job process
def failure_message(exc: BaseException, store: Store, job: JobRecord) -> str:
    """One line a user can act on, for the job's error column."""
    full = disk_full_message(exc, str(store.workspace), retry_advice(job.kind, job.id))
    if full:
        return full
    if isinstance(exc, DefectPruneError):
        return str(exc)
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def execute_job(store: Store, job_id: int, parent_pid: int | None = None) -> str:
    """Run one claimed job in this process and record how it ended; returns the final
    state. The worker runs this in a child process; tests may call it directly."""
    from core.runs.jobs import KINDS, Heartbeat, JobContext
    from core.train import StopRequested

    job = store.get_job(job_id)
    if job.state != RUNNING:
        return job.state
    store.set_job_pid(job_id, os.getpid())
    context = JobContext(store, job)
    context.out_dir.mkdir(parents=True, exist_ok=True)
    heartbeat = Heartbeat(context, parent_pid=parent_pid)
    heartbeat.start()
    state, message, error, result = FAILED, "failed", None, None
    try:
        print(f"job {job_id} ({job.kind}) attempt {job.attempts}: {job.params}", flush=True)
        result = KINDS[job.kind].run(context)
        if context.final_state == STOPPED:
            state, message = STOPPED, context.final_message or "stopped"
        else:
            state, message = SUCCEEDED, "done"
    except (StopRequested, KeyboardInterrupt):
        state, message = STOPPED, "stopped"
    except BaseException as exc:  # every failure is recorded, whatever its type
        if context.stop_requested and isinstance(exc, DefectPruneError):
            state, message = STOPPED, f"stopped: {exc}"  # e.g. training stopped before its first epoch
        else:
            state, message, error = FAILED, "failed", failure_message(exc, store, job)
            traceback.print_exc()
    finally:
        heartbeat.stop()
    try:
        context.flush()
    except Exception:
        pass
    store.finish_job(job_id, state, message=message, error=error, result=result)
    print(f"job {job_id}: {state}{': ' + error if error else ''}", flush=True)
    return state
