"""The worker: runs queued jobs, each in its own process, one at a time by default.

``worker --slots N`` runs up to N jobs at once, one per slot, and never two in one slot: on a
machine with GPUs slot i's job process sees only the i-th GPU (``CUDA_VISIBLE_DEVICES``), so a
4-GPU box runs four jobs, one per GPU; on a CPU machine the slots share the cores (each job
process gets ``OMP_NUM_THREADS`` = cores // N, so torch starts with that many threads). N is
at most the GPU count (with GPUs) or the core count; the store records each job's slot.

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
import shutil
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
SLOTS_ENV = "DEFECTPRUNE_WORKER_SLOTS"  # slots of the worker the dashboard starts (default 1)
SLOT_ENV = "DEFECTPRUNE_WORKER_SLOT"  # set in a job process: the slot it runs in
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
    slots: int = 1  # jobs at once, one per slot (the machine has 2 cores: one training job uses them)
    idle_exit: float | None = None  # leave after this long without work (None: never)
    max_jobs: int | None = None  # leave after this many jobs (tests, batch use)

    def __post_init__(self) -> None:
        if self.heartbeat_timeout is None:
            self.heartbeat_timeout = default_heartbeat_timeout()
        if self.stop_grace is None:
            self.stop_grace = default_stop_grace()
        if self.slots < 1:
            raise WorkerSlotsError(f"a worker has at least 1 slot, not {self.slots}")


# ---------------------------------------------------------------- slots and their devices
class WorkerSlotsError(DefectPruneError):
    """More worker slots than the machine has GPUs (or CPU cores)."""


def visible_gpus() -> list[str]:
    """The GPUs a job may use, as ``CUDA_VISIBLE_DEVICES`` names them: that variable's list
    when it is set (up to a negative id, which hides the rest), else the GPUs ``nvidia-smi -L``
    lists; none without either. Cheap: no torch import in the worker."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        names = []
        for name in (part.strip() for part in env.split(",")):
            if not name or name.startswith("-"):
                break
            names.append(name)
        return names
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if listed.returncode != 0:
        return []
    return [line.split(":", 1)[0].split()[1] for line in listed.stdout.splitlines()
            if line.startswith("GPU ") and ":" in line]


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SlotPlan:
    """What each slot's job process gets: its GPU (``gpus[i]``; none on a CPU machine) and its
    CPU threads."""
    slots: int
    gpus: tuple[str, ...]
    threads: int

    def env(self, slot: int) -> dict[str, str]:
        """The environment a job process in ``slot`` adds to the worker's. One slot changes
        nothing but the slot's name: the job sees every GPU and the torch default threads."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not one of this worker's {self.slots}")
        env = {SLOT_ENV: str(slot)}
        if self.slots > 1:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
        return env

    def describe(self, slot: int) -> str:
        env = self.env(slot)
        device = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else (
            "every GPU" if self.gpus else "CPU")
        threads = f", {env['OMP_NUM_THREADS']} CPU thread(s)" if "OMP_NUM_THREADS" in env else ""
        return f"slot {slot} ({device}{threads})"


def max_slots(gpus: list[str] | None = None, cores: int | None = None) -> int:
    """The most slots this machine takes: one per GPU where there are GPUs, else one per core."""
    gpus = visible_gpus() if gpus is None else gpus
    return len(gpus) if gpus else (cpu_cores() if cores is None else cores)


def slot_plan(slots: int, gpus: list[str] | None = None, cores: int | None = None) -> SlotPlan:
    """The slots of a ``worker --slots N``; `WorkerSlotsError` above the machine's GPUs (or cores)."""
    gpus = visible_gpus() if gpus is None else list(gpus)
    cores = cpu_cores() if cores is None else cores
    limit = max_slots(gpus, cores)
    if slots < 1:
        raise WorkerSlotsError(f"--slots takes 1 or more, not {slots}")
    if slots > limit:
        what = (f"{len(gpus)} GPU(s) (CUDA_VISIBLE_DEVICES or nvidia-smi), one job per GPU" if gpus
                else f"{cores} CPU core(s), one job per core at least")
        raise WorkerSlotsError(f"--slots {slots} is more than this machine takes: {what}; use --slots {limit} or fewer")
    return SlotPlan(slots, tuple(gpus[:slots]), max(1, cores // slots))


def configured_slots() -> int:
    """The slots of the worker the dashboard starts: ``DEFECTPRUNE_WORKER_SLOTS`` (default 1; a
    value that is not a whole number counts as 1), capped at what the machine takes."""
    try:
        wanted = int(os.environ.get(SLOTS_ENV, "1"))
    except ValueError:
        return 1
    return 1 if wanted <= 1 else min(wanted, max_slots())


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
    slot: int = 0


def _child_env(store: Store) -> dict[str, str]:
    env = dict(os.environ)
    env["DEFECTPRUNE_WORKSPACE"] = str(store.workspace)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def spawn_job_process(store: Store, job_id: int, kind: str, slot: int = 0,
                      plan: SlotPlan | None = None) -> _Child:
    folder = store.job_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / LOG_FILE
    env = _child_env(store)
    env.update((plan or SlotPlan(1, (), 1)).env(slot))
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "core", "worker", "--db", str(store.path), "--run-job", str(job_id),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: a kill reaches its data loaders too
        )
    return _Child(job_id, kind, process, log, slot=slot)


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
    plan = slot_plan(settings.slots)  # WorkerSlotsError before anything is taken

    def say(text: str) -> None:
        print(f"[worker {os.getpid()}] {text}", file=out, flush=True)

    lock = WorkerLock(store)
    if not lock.acquire(wait=1.0):
        say(f"another worker already runs jobs for {store.workspace}; leaving")
        return 0
    worker_id = store.register_worker(os.getpid(), socket.gethostname())
    worker = _Worker(store, settings, worker_id, say, plan)
    if plan.slots > 1:
        say(f"{plan.slots} slots: " + ", ".join(plan.describe(i) for i in range(plan.slots)))
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

    def __init__(self, store: Store, settings: WorkerSettings, worker_id: int, say: Callable[[str], None],
                 plan: SlotPlan | None = None):
        self.store, self.settings, self.worker_id, self.say = store, settings, worker_id, say
        self.plan = plan or slot_plan(settings.slots)
        self.children: dict[int, _Child] = {}  # job id -> its process, in its own slot
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

    def free_slot(self) -> int | None:
        """The lowest slot no running job holds (None: every slot is busy)."""
        busy = {child.slot for child in self.children.values()}
        return next((slot for slot in range(self.plan.slots) if slot not in busy), None)

    def start_jobs(self) -> None:
        """Claim queued jobs, oldest first, one per free slot, each in its own process."""
        while not self.shutting_down and not self.limit_reached():
            slot = self.free_slot()
            if slot is None:
                return
            job = self.store.claim_next_job(os.getpid(), slot=slot)
            if job is None:
                return
            try:
                child = spawn_job_process(self.store, job.id, job.kind, slot, self.plan)
            except OSError as exc:
                self.store.finish_job(job.id, FAILED, message="failed", error=f"cannot start the job process: {exc}")
                continue
            self.children[job.id] = child
            self.store.set_job_pid(job.id, child.process.pid)
            where = f" in {self.plan.describe(slot)}" if self.plan.slots > 1 else ""
            self.say(f"job {job.id} ({job.kind}): started{where}, pid {child.process.pid}")

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
        slot = os.environ.get(SLOT_ENV)
        where = "" if slot is None else (
            f" in slot {slot} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '<unset>')})")
        print(f"job {job_id} ({job.kind}) attempt {job.attempts}{where}: {job.params}", flush=True)
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
