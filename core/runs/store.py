"""The run store: one SQLite file in the workspace that every process reads and writes.

It holds the datasets used, the models (checkpoints), the jobs (what to run, its state and
progress), prune runs with their rounds, and artifacts (files under the workspace). Files
themselves live on disk and are written atomically; the database only points to them.

Why it is safe with a dashboard reading while a worker writes:

- WAL journal: readers never block the writer and the writer never blocks readers;
- every write is a short ``BEGIN IMMEDIATE`` transaction, so a writer takes the write lock
  up front (a deferred transaction that upgrades from read to write can fail with "database
  is locked" without waiting) and waits up to ``busy_timeout`` for another writer;
- one connection per thread and per process (connections are never shared or inherited).

The schema has a version and ordered migrations from the first release on; opening an
older file migrates it in one transaction, opening a newer one is refused.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.atomic import json_default
from core.config import workspace_dir
from core.errors import DefectPruneError

DB_FILE = "defectprune.sqlite"
RUNS_DIR = "runs"
BUSY_TIMEOUT_MS = 30_000

QUEUED, RUNNING, SUCCEEDED, FAILED, STOPPED = "queued", "running", "succeeded", "failed", "stopped"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, STOPPED)
FINAL_STATES = (SUCCEEDED, FAILED, STOPPED)


class StoreError(DefectPruneError):
    """The run store cannot be opened or written."""


class JobNotFoundError(DefectPruneError):
    pass


class JobStateError(DefectPruneError):
    """The job is not in a state that allows what was asked (e.g. resume a running job)."""


# ---------------------------------------------------------------- schema and migrations
# The first release's schema, kept verbatim: migrations start from it. The tests open a v1
# file built from a frozen copy (tests/fixtures/run_store_v1.sql), so an edit here shows.
V1_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE schema_version (
        version INTEGER NOT NULL,
        applied_at REAL NOT NULL,
        description TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE datasets (
        id INTEGER PRIMARY KEY,
        format TEXT NOT NULL,
        root TEXT NOT NULL DEFAULT '',
        split_seed INTEGER NOT NULL DEFAULT 0,
        options_json TEXT NOT NULL DEFAULT '{}',
        size_json TEXT,
        created_at REAL NOT NULL,
        UNIQUE (format, root, split_seed, options_json)
    )""",
    """CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        params_json TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued',
        progress REAL NOT NULL DEFAULT 0,
        message TEXT NOT NULL DEFAULT '',
        eta_seconds REAL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        heartbeat_at REAL,
        error TEXT,
        stop_requested INTEGER NOT NULL DEFAULT 0,
        pid INTEGER,
        result_json TEXT,
        out_dir TEXT,
        dataset_id INTEGER REFERENCES datasets(id)
    )""",
    "CREATE INDEX jobs_state ON jobs (state, id)",
    """CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        job_id INTEGER REFERENCES jobs(id),
        dataset_id INTEGER REFERENCES datasets(id),
        parent_id INTEGER REFERENCES models(id),
        arch TEXT NOT NULL DEFAULT '',
        encoder TEXT NOT NULL DEFAULT '',
        pruned INTEGER NOT NULL DEFAULT 0,
        params INTEGER,
        macs INTEGER,
        metrics_json TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE prune_runs (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL UNIQUE REFERENCES jobs(id),
        base_model_id INTEGER REFERENCES models(id),
        base_checkpoint TEXT NOT NULL,
        out_dir TEXT NOT NULL,
        method TEXT NOT NULL,
        settings_json TEXT NOT NULL DEFAULT '{}',
        base_json TEXT,
        result_json TEXT,
        stopped TEXT,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE rounds (
        id INTEGER PRIMARY KEY,
        prune_run_id INTEGER NOT NULL REFERENCES prune_runs(id),
        round INTEGER NOT NULL,
        accepted INTEGER NOT NULL,
        macs INTEGER NOT NULL,
        params INTEGER NOT NULL,
        macs_reduction REAL NOT NULL,
        params_reduction REAL NOT NULL,
        defect_miou REAL,
        drop_points REAL,
        latency_ms REAL,
        wall_s REAL,
        checkpoint TEXT NOT NULL,
        model_id INTEGER REFERENCES models(id),
        record_json TEXT NOT NULL,
        UNIQUE (prune_run_id, round)
    )""",
    """CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY,
        job_id INTEGER REFERENCES jobs(id),
        model_id INTEGER REFERENCES models(id),
        kind TEXT NOT NULL,
        path TEXT NOT NULL UNIQUE,
        bytes INTEGER,
        created_at REAL NOT NULL
    )""",
)

V2_SCHEMA: tuple[str, ...] = (
    # the latest metrics of a running job (loss, val mIoU, last round) for the dashboard
    "ALTER TABLE jobs ADD COLUMN metrics_json TEXT NOT NULL DEFAULT '{}'",
    # how often the job was started (resume counts), who runs it, when a stop was asked
    "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN worker_pid INTEGER",
    "ALTER TABLE jobs ADD COLUMN stop_requested_at REAL",
    """CREATE TABLE workers (
        id INTEGER PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'idle',
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        stopped_at REAL
    )""",
)

V3_SCHEMA: tuple[str, ...] = (
    # the worker slot a job was started in (``worker --slots N``: its GPU or its share of the CPU)
    "ALTER TABLE jobs ADD COLUMN slot INTEGER",
)

# (version, description, statements), applied in order to reach ``SCHEMA_VERSION``.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "first release: datasets, jobs, models, prune runs, rounds, artifacts", V1_SCHEMA),
    (2, "job metrics, attempts, worker pid, stop time; worker heartbeats", V2_SCHEMA),
    (3, "the worker slot of each job", V3_SCHEMA),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


# ---------------------------------------------------------------- records
@dataclass
class JobRecord:
    id: int
    kind: str
    params: dict[str, Any]
    state: str
    progress: float
    message: str
    eta_seconds: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    error: str | None
    stop_requested: bool
    stop_requested_at: float | None
    pid: int | None
    worker_pid: int | None
    result: dict[str, Any] | None
    out_dir: str | None  # relative to the workspace
    dataset_id: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    slot: int | None = None  # the worker slot of its latest start

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("created_at", "started_at", "finished_at", "heartbeat_at", "stop_requested_at"):
            data[key] = iso_time(data[key])
        return data


@dataclass
class WorkerRecord:
    id: int
    pid: int
    host: str
    state: str
    started_at: float
    heartbeat_at: float
    stopped_at: float | None


def iso_time(stamp: float | None) -> str | None:
    """Unix seconds -> ISO 8601 in UTC, for messages and JSON output."""
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, tz=timezone.utc).isoformat(timespec="seconds")


def default_db_path() -> Path:
    return workspace_dir() / DB_FILE


def _json(value: Any) -> str:
    return json.dumps(value, default=json_default, sort_keys=True)


def _load(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


# ---------------------------------------------------------------- the store
class Store:
    """A handle on the run store. Cheap to create; each thread and process that uses it
    gets its own SQLite connection."""

    def __init__(self, path: str | Path | None = None, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        self.path = Path(path).expanduser().resolve() if path is not None else default_db_path()
        self.workspace = self.path.parent
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the workspace folder {self.path.parent} ({exc.strerror}); "
                             "set DEFECTPRUNE_WORKSPACE to a writable folder") from None
        self.migrate()

    # ------------------------------------------------------------ connections
    def connection(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork: SQLite handles must not cross)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints, safe with WAL
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise StoreError(self.problem(exc)) from None
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (journal mode {mode}); put the workspace "
                             "on a local disk")
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.conn = None

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction holding the write lock from its start."""
        conn = self.connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(self.problem(exc, writing=True)) from None
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:  # e.g. disk full: nothing of it was written
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(self.problem(exc, writing=True)) from None

    def problem(self, exc: sqlite3.DatabaseError, writing: bool = False) -> str:
        """What is really wrong with the store, in one line: only a file SQLite says is damaged
        is to be moved aside (moving a healthy store aside because its disk is full or read-only
        would start the job ids over); the rest say what to fix."""
        text = str(exc)
        lowered = text.lower()
        if "full" in lowered or os.strerror(errno.ENOSPC).lower() in lowered:
            return (f"no space left on the device for the run store {self.path} ({text}); free space "
                    "under the workspace: the store and earlier results are intact")
        if "readonly" in lowered or "read-only" in lowered or not os.access(self.workspace, os.W_OK):
            return (f"the run store {self.path} is read-only ({text}); make the workspace writable or "
                    "set DEFECTPRUNE_WORKSPACE to a writable folder (do not move the store aside: it is intact)")
        if "locked" in lowered or "busy" in lowered:
            return f"the run store {self.path} is busy ({text}); try again in a moment"
        if "unable to open" in lowered or "disk i/o" in lowered:
            return (f"the run store {self.path} cannot be opened ({text}); check that the workspace "
                    "folder exists and can be read and written")
        if isinstance(exc, sqlite3.OperationalError) and writing:
            return f"cannot write to the run store {self.path}: {text}"
        return (f"{self.path} is not a usable run store ({text}): the file is damaged; move it aside "
                "and the workspace starts a new one")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One read statement (autocommit: a consistent snapshot, never a lock held after)."""
        try:
            return self.connection().execute(sql, tuple(args)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(self.problem(exc)) from None

    # ------------------------------------------------------------ schema
    def schema_version(self) -> int:
        conn = self.connection()
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
        if not exists:
            return 0
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self) -> int:
        """Bring the file to ``SCHEMA_VERSION``; returns the version it had before."""
        if self.schema_version() == SCHEMA_VERSION:  # the common case, without the write lock
            return SCHEMA_VERSION
        with self.write() as conn:
            before = self.schema_version()  # again, under the lock: another process may have migrated
            if before > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {before}, newer than this DefectPrune knows "
                    f"({SCHEMA_VERSION}); update DefectPrune or use another workspace"
                )
            for version, description, statements in MIGRATIONS:
                if version <= before:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, applied_at, description) VALUES (?, ?, ?)",
                             (version, time.time(), description))
        return before

    # ------------------------------------------------------------ paths
    def relative(self, path: str | Path) -> str:
        """Paths under the workspace are stored relative to it (the workspace can move)."""
        resolved = Path(path).expanduser().resolve()
        try:
            return str(resolved.relative_to(self.workspace))
        except ValueError:
            return str(resolved)

    def absolute(self, path: str | Path) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.workspace / path

    def job_dir(self, job_id: int) -> Path:
        return self.workspace / RUNS_DIR / str(job_id)

    def _last_job_folder(self) -> int:
        """The highest numbered folder under ``runs/``: a store moved aside or emptied starts
        its ids after the folders already on disk, so a new job never reuses (and overwrites)
        an earlier job's folder."""
        try:
            names = [p.name for p in (self.workspace / RUNS_DIR).iterdir()]
        except OSError:
            return 0
        return max((int(n) for n in names if n.isdigit()), default=0)

    # ------------------------------------------------------------ jobs
    def create_job(self, kind: str, params: dict[str, Any], dataset_id: int | None = None) -> int:
        with self.write() as conn:  # under the write lock: two creators cannot pick the same id
            last = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0])
            job_id = max(last, self._last_job_folder()) + 1
            cursor = conn.execute(
                "INSERT INTO jobs (id, kind, params_json, state, message, created_at, dataset_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, _json(params), QUEUED, "queued", time.time(), dataset_id))
            job_id = int(cursor.lastrowid)
            conn.execute("UPDATE jobs SET out_dir = ? WHERE id = ?", (f"{RUNS_DIR}/{job_id}", job_id))
        return job_id

    def get_job(self, job_id: int) -> JobRecord:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", (int(job_id),))
        if not rows:
            raise JobNotFoundError(f"there is no job {job_id} in {self.path}; `python -m core jobs list` shows them")
        return _job(rows[0])

    def list_jobs(self, states: Sequence[str] | None = None, kind: str | None = None,
                  limit: int | None = None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY id DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [_job(r) for r in self.query(sql, args)]

    def claim_next_job(self, worker_pid: int, slot: int | None = None) -> JobRecord | None:
        """The oldest queued job, atomically marked running for this worker in ``slot`` (None:
        queue empty)."""
        now = time.time()
        with self.write() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = ?, started_at = ?, heartbeat_at = ?, finished_at = NULL, worker_pid = ?, "
                "slot = ?, pid = NULL, attempts = attempts + 1, message = 'starting', error = NULL "
                "WHERE id = (SELECT id FROM jobs WHERE state = ? ORDER BY id LIMIT 1) AND state = ? RETURNING *",
                (RUNNING, now, now, worker_pid, slot, QUEUED, QUEUED)).fetchone()
        return _job(row) if row else None  # from the claim itself: no read after it that could fail

    def set_job_pid(self, job_id: int, pid: int) -> None:
        with self.write() as conn:
            conn.execute("UPDATE jobs SET pid = ?, heartbeat_at = ? WHERE id = ?", (pid, time.time(), job_id))

    def heartbeat(self, job_id: int, progress: float | None = None, message: str | None = None,
                  eta_seconds: float | None = None, metrics: dict[str, Any] | None = None) -> bool:
        """Mark the job alive, with its latest progress when given; returns whether a stop
        was requested (one statement: the job's only regular write)."""
        now = time.time()
        sets, args = ["heartbeat_at = ?"], [now]
        if progress is not None:
            sets += ["progress = ?", "eta_seconds = ?"]
            args += [float(min(max(progress, 0.0), 1.0)), eta_seconds]
        if message is not None:
            sets.append("message = ?")
            args.append(message)
        if metrics is not None:
            sets.append("metrics_json = ?")
            args.append(_json(metrics))
        with self.write() as conn:
            row = conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state = ? RETURNING stop_requested",
                               (*args, job_id, RUNNING)).fetchone()
        # a row that is no longer running (stopped, or failed by a sweep) means: stop
        return bool(row[0]) if row else True

    def finish_job(self, job_id: int, state: str, message: str = "", error: str | None = None,
                   result: dict[str, Any] | None = None, only_if_running: bool = True) -> bool:
        """Record the end of a job; with ``only_if_running`` an end already recorded (a kill
        after the stop grace, a stale-heartbeat sweep) is kept. Returns whether it wrote."""
        if state not in FINAL_STATES:
            raise ValueError(f"{state} is not a final state")
        progress_sql = ", progress = 1" if state == SUCCEEDED else ""
        sql = (f"UPDATE jobs SET state = ?, message = ?, error = ?, result_json = COALESCE(?, result_json), "
               f"finished_at = ?, eta_seconds = NULL{progress_sql} WHERE id = ?")
        args: list[Any] = [state, message, error, None if result is None else _json(result), time.time(), job_id]
        if only_if_running:
            sql += " AND state = ?"
            args.append(RUNNING)
        with self.write() as conn:
            return conn.execute(sql, args).rowcount > 0

    def request_stop(self, job_id: int) -> JobRecord:
        """A queued job is stopped at once; a running one is asked to stop (the job sees it
        within about a second; the worker kills it after the grace period)."""
        now = time.time()
        with self.write() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"there is no job {job_id} in {self.path}")
            if row["state"] == QUEUED:
                conn.execute("UPDATE jobs SET state = ?, message = ?, finished_at = ?, stop_requested = 1, "
                             "stop_requested_at = ? WHERE id = ?",
                             (STOPPED, "stopped before it started", now, now, job_id))
            elif row["state"] == RUNNING:
                conn.execute("UPDATE jobs SET stop_requested = 1, stop_requested_at = COALESCE(stop_requested_at, ?), "
                             "message = 'stopping' WHERE id = ?", (now, job_id))
        return self.get_job(job_id)

    def requeue(self, job_id: int, message: str = "queued again (resume)") -> JobRecord:
        """Queue a failed or stopped job again, keeping its id, folder and outputs (whether its
        kind may be resumed is `core.runs.kinds`'s to say: the store knows no kinds). The queue
        is ordered by id, so it runs before the jobs submitted after it first was (it keeps its
        place rather than going to the end)."""
        with self.write() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"there is no job {job_id} in {self.path}")
            if row["state"] not in (FAILED, STOPPED):
                raise JobStateError(f"job {job_id} is {row['state']}; only a failed or stopped job can be resumed")
            conn.execute("UPDATE jobs SET state = ?, message = ?, error = NULL, stop_requested = 0, "
                         "stop_requested_at = NULL, finished_at = NULL, eta_seconds = NULL, pid = NULL, "
                         "worker_pid = NULL WHERE id = ?", (QUEUED, message, job_id))
        return self.get_job(job_id)

    def fail_stale_jobs(self, timeout_s: float, exclude: Sequence[int] = ()) -> list[int]:
        """Running jobs whose heartbeat is older than ``timeout_s``: their process died
        (worker killed, machine crash). They are marked failed with when they stopped (or
        stopped, when a stop had been asked for). Returns their ids."""
        cutoff = time.time() - timeout_s
        failed = []
        with self.write() as conn:
            rows = conn.execute("SELECT id, heartbeat_at, started_at, stop_requested FROM jobs WHERE state = ? AND "
                                "COALESCE(heartbeat_at, started_at, 0) < ?", (RUNNING, cutoff)).fetchall()
            for row in rows:
                if row["id"] in exclude:
                    continue
                last = row["heartbeat_at"] or row["started_at"]
                if row["stop_requested"]:  # the user wanted it stopped anyway: say so, not failed
                    state, reason, message = STOPPED, None, f"stopped; its process had ended at {iso_time(last)}"
                else:
                    state, message = FAILED, "failed"
                    reason = (f"worker stopped responding (killed or crashed) at {iso_time(last)}; "
                              f"no heartbeat for more than {timeout_s:g} s")
                conn.execute("UPDATE jobs SET state = ?, error = ?, message = ?, finished_at = ?, eta_seconds = NULL "
                             "WHERE id = ? AND state = ?", (state, reason, message, time.time(), row["id"], RUNNING))
                failed.append(int(row["id"]))
        return failed

    # ------------------------------------------------------------ workers
    def register_worker(self, pid: int, host: str = "") -> int:
        now = time.time()
        with self.write() as conn:
            return int(conn.execute("INSERT INTO workers (pid, host, started_at, heartbeat_at) VALUES (?, ?, ?, ?)",
                                    (pid, host, now, now)).lastrowid)

    def worker_heartbeat(self, worker_id: int, state: str) -> None:
        with self.write() as conn:
            conn.execute("UPDATE workers SET heartbeat_at = ?, state = ? WHERE id = ?", (time.time(), state, worker_id))

    def worker_stopped(self, worker_id: int) -> None:
        with self.write() as conn:
            conn.execute("UPDATE workers SET state = 'stopped', stopped_at = ? WHERE id = ?", (time.time(), worker_id))

    def live_workers(self, timeout_s: float) -> list[WorkerRecord]:
        rows = self.query("SELECT * FROM workers WHERE stopped_at IS NULL AND heartbeat_at >= ? ORDER BY id",
                          (time.time() - timeout_s,))
        return [WorkerRecord(**{k: r[k] for k in r.keys()}) for r in rows]

    # ------------------------------------------------------------ datasets and models
    def upsert_dataset(self, format_name: str, root: str | Path | None, split_seed: int,
                       options: dict[str, Any] | None = None, size: Sequence[int] | None = None) -> int:
        root_text = self.relative(root) if root else ""
        options_text = _json(options or {})
        with self.write() as conn:
            conn.execute("INSERT INTO datasets (format, root, split_seed, options_json, size_json, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (format, root, split_seed, options_json) DO UPDATE "
                         "SET size_json = COALESCE(excluded.size_json, size_json)",
                         (format_name, root_text, int(split_seed), options_text,
                          None if size is None else _json(list(size)), time.time()))
            row = conn.execute("SELECT id FROM datasets WHERE format = ? AND root = ? AND split_seed = ? AND "
                               "options_json = ?", (format_name, root_text, int(split_seed), options_text)).fetchone()
        return int(row[0])

    def get_dataset(self, dataset_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM datasets WHERE id = ?", (dataset_id,))
        return _dataset(rows[0], self) if rows else None

    def list_datasets(self) -> list[dict[str, Any]]:
        return [_dataset(r, self) for r in self.query("SELECT * FROM datasets ORDER BY id")]

    def register_model(self, path: str | Path, *, job_id: int | None = None, dataset_id: int | None = None,
                       parent_id: int | None = None, arch: str = "", encoder: str = "", pruned: bool = False,
                       params: int | None = None, macs: int | None = None,
                       metrics: dict[str, Any] | None = None) -> int:
        stored = self.relative(path)
        with self.write() as conn:
            conn.execute(
                "INSERT INTO models (path, job_id, dataset_id, parent_id, arch, encoder, pruned, params, macs, "
                "metrics_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
                "job_id = excluded.job_id, dataset_id = COALESCE(excluded.dataset_id, dataset_id), "
                "parent_id = COALESCE(excluded.parent_id, parent_id), arch = excluded.arch, "
                "encoder = excluded.encoder, pruned = excluded.pruned, params = excluded.params, "
                "macs = excluded.macs, metrics_json = excluded.metrics_json",
                (stored, job_id, dataset_id, parent_id, arch, encoder, int(pruned), params, macs,
                 _json(metrics or {}), time.time()))
            return int(conn.execute("SELECT id FROM models WHERE path = ?", (stored,)).fetchone()[0])

    def find_model(self, path: str | Path) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM models WHERE path = ?", (self.relative(path),))
        return _model(rows[0], self) if rows else None

    def list_models(self) -> list[dict[str, Any]]:
        return [_model(r, self) for r in self.query("SELECT * FROM models ORDER BY id")]

    # ------------------------------------------------------------ prune runs and rounds
    def upsert_prune_run(self, job_id: int, base_checkpoint: str | Path, out_dir: str | Path, method: str,
                         settings: dict[str, Any], base_model_id: int | None = None) -> int:
        with self.write() as conn:
            conn.execute(
                "INSERT INTO prune_runs (job_id, base_model_id, base_checkpoint, out_dir, method, settings_json, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET "
                "base_model_id = COALESCE(excluded.base_model_id, base_model_id)",
                (job_id, base_model_id, self.relative(base_checkpoint), self.relative(out_dir), method,
                 _json(settings), time.time()))
            return int(conn.execute("SELECT id FROM prune_runs WHERE job_id = ?", (job_id,)).fetchone()[0])

    def update_prune_run(self, prune_run_id: int, base: dict[str, Any] | None = None,
                         result: dict[str, Any] | None = None, stopped: str | None = None) -> None:
        with self.write() as conn:
            conn.execute("UPDATE prune_runs SET base_json = COALESCE(?, base_json), result_json = COALESCE(?, result_json), "
                         "stopped = COALESCE(?, stopped) WHERE id = ?",
                         (None if base is None else _json(base), None if result is None else _json(result),
                          stopped, prune_run_id))

    def save_rounds(self, prune_run_id: int, rounds: Sequence[dict[str, Any]],
                    model_ids: dict[int, int] | None = None) -> int:
        """Mirror the loop's round records (``rounds.json``) into the rounds table; a round
        already stored is updated, never duplicated. Returns how many rounds there are."""
        model_ids = model_ids or {}
        with self.write() as conn:
            for r in rounds:
                conn.execute(
                    "INSERT INTO rounds (prune_run_id, round, accepted, macs, params, macs_reduction, params_reduction, "
                    "defect_miou, drop_points, latency_ms, wall_s, checkpoint, model_id, record_json) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (prune_run_id, round) DO UPDATE SET "
                    "accepted = excluded.accepted, macs = excluded.macs, params = excluded.params, "
                    "macs_reduction = excluded.macs_reduction, params_reduction = excluded.params_reduction, "
                    "defect_miou = excluded.defect_miou, drop_points = excluded.drop_points, "
                    "latency_ms = excluded.latency_ms, wall_s = excluded.wall_s, checkpoint = excluded.checkpoint, "
                    "model_id = COALESCE(excluded.model_id, model_id), record_json = excluded.record_json",
                    (prune_run_id, int(r["round"]), int(bool(r.get("accepted", True))), int(r["macs"]),
                     int(r["params"]), float(r["macs_reduction"]), float(r["params_reduction"]), r.get("defect_miou"),
                     r.get("drop"), r.get("latency_ms"), r.get("wall_s"), self.relative(r["checkpoint"]),
                     model_ids.get(int(r["round"])), _json(r)))
            return int(conn.execute("SELECT COUNT(*) FROM rounds WHERE prune_run_id = ?",
                                    (prune_run_id,)).fetchone()[0])

    def get_prune_run(self, job_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM prune_runs WHERE job_id = ?", (job_id,))
        if not rows:
            return None
        row = rows[0]
        return {
            "id": row["id"], "job_id": row["job_id"], "base_model_id": row["base_model_id"],
            "base_checkpoint": str(self.absolute(row["base_checkpoint"])), "out_dir": str(self.absolute(row["out_dir"])),
            "method": row["method"], "settings": _load(row["settings_json"], {}), "base": _load(row["base_json"]),
            "result": _load(row["result_json"]), "stopped": row["stopped"], "created_at": iso_time(row["created_at"]),
        }

    def list_rounds(self, job_id: int) -> list[dict[str, Any]]:
        rows = self.query("SELECT r.* FROM rounds r JOIN prune_runs p ON p.id = r.prune_run_id WHERE p.job_id = ? "
                          "ORDER BY r.round", (job_id,))
        out = []
        for r in rows:
            out.append({
                "round": r["round"], "accepted": bool(r["accepted"]), "macs": r["macs"], "params": r["params"],
                "macs_reduction": r["macs_reduction"], "params_reduction": r["params_reduction"],
                "defect_miou": r["defect_miou"], "drop": r["drop_points"], "latency_ms": r["latency_ms"],
                "wall_s": r["wall_s"], "checkpoint": str(self.absolute(r["checkpoint"])), "model_id": r["model_id"],
                "record": _load(r["record_json"], {}),
            })
        return out

    # ------------------------------------------------------------ artifacts
    def add_artifact(self, kind: str, path: str | Path, job_id: int | None = None,
                     model_id: int | None = None) -> int:
        target = Path(path)
        size = _size(target)
        stored = self.relative(target)
        with self.write() as conn:
            conn.execute("INSERT INTO artifacts (job_id, model_id, kind, path, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT (path) DO UPDATE SET job_id = excluded.job_id, "
                         "model_id = COALESCE(excluded.model_id, model_id), kind = excluded.kind, bytes = excluded.bytes",
                         (job_id, model_id, kind, stored, size, time.time()))
            return int(conn.execute("SELECT id FROM artifacts WHERE path = ?", (stored,)).fetchone()[0])

    def list_artifacts(self, job_id: int | None = None) -> list[dict[str, Any]]:
        if job_id is None:
            rows = self.query("SELECT * FROM artifacts ORDER BY id")
        else:
            rows = self.query("SELECT * FROM artifacts WHERE job_id = ? ORDER BY id", (job_id,))
        return [{"id": r["id"], "job_id": r["job_id"], "model_id": r["model_id"], "kind": r["kind"],
                 "path": str(self.absolute(r["path"])), "bytes": r["bytes"], "created_at": iso_time(r["created_at"])}
                for r in rows]


# ---------------------------------------------------------------- row conversion
def _job(row: sqlite3.Row) -> JobRecord:
    keys = row.keys()
    return JobRecord(
        id=row["id"], kind=row["kind"], params=_load(row["params_json"], {}), state=row["state"],
        progress=float(row["progress"]), message=row["message"], eta_seconds=row["eta_seconds"],
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        heartbeat_at=row["heartbeat_at"], error=row["error"], stop_requested=bool(row["stop_requested"]),
        stop_requested_at=row["stop_requested_at"] if "stop_requested_at" in keys else None,
        pid=row["pid"], worker_pid=row["worker_pid"] if "worker_pid" in keys else None,
        result=_load(row["result_json"]), out_dir=row["out_dir"], dataset_id=row["dataset_id"],
        metrics=_load(row["metrics_json"], {}) if "metrics_json" in keys else {},
        attempts=int(row["attempts"]) if "attempts" in keys else 0,
        slot=row["slot"] if "slot" in keys else None,
    )


def _dataset(row: sqlite3.Row, store: Store) -> dict[str, Any]:
    return {"id": row["id"], "format": row["format"],
            "root": str(store.absolute(row["root"])) if row["root"] else None,
            "split_seed": row["split_seed"], "options": _load(row["options_json"], {}),
            "size": _load(row["size_json"]), "created_at": iso_time(row["created_at"])}


def _model(row: sqlite3.Row, store: Store) -> dict[str, Any]:
    return {"id": row["id"], "path": str(store.absolute(row["path"])), "job_id": row["job_id"],
            "dataset_id": row["dataset_id"], "parent_id": row["parent_id"], "arch": row["arch"],
            "encoder": row["encoder"], "pruned": bool(row["pruned"]), "params": row["params"], "macs": row["macs"],
            "metrics": _load(row["metrics_json"], {}), "created_at": iso_time(row["created_at"])}


def _size(path: Path) -> int | None:
    try:
        if path.is_dir():
            return int(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))
        return int(path.stat().st_size)
    except OSError:
        return None
