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
from core.runs.jobs import Heartbeat, JobContext
from core.runs.kinds import job_kind, retry_advice
from core.runs.store import FAILED, RUNNING, RUNS_DIR, STOPPED, SUCCEEDED, JobRecord, Store, StoreError

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
    worker = _Worker(store, settings, worker_id, say)
    previous = {s: signal.signal(s, worker.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run()
    finally:
        worker.abandon_jobs()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        try:
            _try(say, store.worker_stopped, worker_id)
        finally:
            lock.release()
    return 0


class _Worker:
    """A worker between two polls: its running job processes, how many it finished, and when
    it last beat, swept for stale jobs and had work. Every step of a poll can be repeated, so
    a poll the run store fails halfway through is simply run again later."""

    def __init__(self, store: Store, settings: WorkerSettings, worker_id: int, say: Callable[[str], None]):
        self.store, self.settings, self.worker_id, self.say = store, settings, worker_id, say
        self.children: dict[int, _Child] = {}
        self.done = 0
        self.shutting_down = False
        self.store_failures = 0
        self.idle_since = self.last_sweep = self.last_beat = time.monotonic()

    def on_signal(self, signum: int, _frame: object) -> None:
        self.shutting_down = True

    def run(self) -> None:
        for job_id in self.store.fail_stale_jobs(self.settings.heartbeat_timeout):
            self.say(f"job {job_id}: marked failed, its heartbeat stopped (the previous worker died)")
        self.idle_since = self.last_sweep = self.last_beat = time.monotonic()
        while True:
            try:
                if not self.poll():
                    return
                self.store_failures = 0
            except STORE_FAILURES as exc:
                if self.shutting_down:  # the stop requests cannot go through the store
                    self.say(f"the run store failed ({exc}) while shutting down; stopping {len(self.children)} "
                             "job(s) by signal")
                    _stop_without_store(self.store, self.children, self.settings.stop_grace, self.say)
                    return
                self.back_off(exc)
                continue
            time.sleep(self.settings.poll_seconds)

    def poll(self) -> bool:
        """Supervise the running jobs, start queued ones, keep the worker's heartbeat; False
        when the worker should leave."""
        now = time.monotonic()
        self.supervise()
        if self.shutting_down and not self.children:
            return False
        self.start_jobs()
        if not self.children:
            if self.limit_reached():
                return False
            if self.settings.idle_exit is not None and now - self.idle_since > self.settings.idle_exit:
                self.say(f"idle for {self.settings.idle_exit:g} s; leaving")
                return False
        else:
            self.idle_since = now
        self.keep_alive(now)
        return True

    def supervise(self) -> None:
        """Record the end of every job process that ended (or was killed now)."""
        for job_id, child in list(self.children.items()):
            code = self.exit_code(job_id, child)
            if code is None:
                continue
            _record_exit(self.store, child, code)
            self.say(f"job {job_id}: {self.store.get_job(job_id).state} (exit code {code})")
            del self.children[job_id]
            self.done += 1

    def exit_code(self, job_id: int, child: _Child) -> int | None:
        """The exit code of a job process that has ended, or that is killed now because it
        did not honour a stop within the grace; None while it runs on. A shutting-down
        worker asks each of its jobs to stop."""
        code = child.process.poll()
        if code is not None:
            return code
        job = self.store.get_job(job_id)
        if self.shutting_down and not job.stop_requested:
            self.store.request_stop(job_id)
            return None
        if not job.stop_requested and job.state == RUNNING:
            return None
        asked = job.stop_requested_at or time.time()
        if time.time() - asked <= self.settings.stop_grace:
            return None
        _kill(child)
        self.store.finish_job(job_id, STOPPED, message=_killed_message(self.settings.stop_grace))
        self.say(f"job {job_id}: killed after the stop grace")
        return child.process.returncode

    def limit_reached(self) -> bool:
        return self.settings.max_jobs is not None and self.done + len(self.children) >= self.settings.max_jobs

    def start_jobs(self) -> None:
        """Claim queued jobs, oldest first, up to the concurrency, each in its own process."""
        while not self.shutting_down and not self.limit_reached() and len(self.children) < self.settings.concurrency:
            job = self.store.claim_next_job(os.getpid())
            if job is None:
                return
            try:
                child = spawn_job_process(self.store, job.id, job.kind)
            except OSError as exc:
                self.store.finish_job(job.id, FAILED, message="failed", error=f"cannot start the job process: {exc}")
                continue
            self.children[job.id] = child
            self.store.set_job_pid(job.id, child.process.pid)
            self.say(f"job {job.id} ({job.kind}): started, pid {child.process.pid}")

    def keep_alive(self, now: float) -> None:
        """The worker's own heartbeat every second, and a sweep for jobs whose process died."""
        if now - self.last_beat >= 1.0:
            self.store.worker_heartbeat(self.worker_id, "running" if self.children else "idle")
            self.last_beat = now
        timeout = self.settings.heartbeat_timeout
        if now - self.last_sweep >= max(timeout / 3, 1.0):
            for job_id in self.store.fail_stale_jobs(timeout, exclude=list(self.children)):
                self.say(f"job {job_id}: marked failed, no heartbeat for {timeout:g} s")
            self.last_sweep = now

    def back_off(self, exc: Exception) -> None:
        """A locked or full store: the jobs run on (they keep their own heartbeat) and the
        poll is tried again, more slowly each time."""
        self.store_failures += 1
        pause = min(MAX_STORE_BACKOFF, max(self.settings.poll_seconds, DEFAULT_POLL) * 2 ** (self.store_failures - 1))
        self.say(f"the run store failed ({exc}); {len(self.children)} running job(s) go on; retrying in {pause:g} s")
        time.sleep(pause)

    def abandon_jobs(self) -> None:
        """Kill the jobs still running when the loop itself failed (an error, not a shutdown)."""
        for job_id, child in self.children.items():
            _kill(child)
            _try(self.say, self.store.finish_job, job_id, FAILED, message="failed",
                 error=f"the worker stopped with an error while the job ran; {retry_advice(child.kind, job_id)}")


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
        result = job_kind(job.kind).run(context)
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
