"""``python -m core worker [--slots N] [--idle-exit S] ...``: run queued jobs in the background
(the dashboard starts one on demand), up to N at once: one per GPU on a machine with GPUs
(slot i's job sees only GPU i), or sharing the CPU cores. ``--run-job ID`` is internal: the
worker starts each job as such a child process."""

from __future__ import annotations

import argparse

from core.cli import non_negative_float, positive_int
from core.runs.kinds import JOB_KINDS
from core.runs.worker import DEFAULT_POLL, WorkerSettings, slot_plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("worker", help=f"run queued jobs ({', '.join(JOB_KINDS)})")
    parser.add_argument("--db", default=None, help="run store file (default: the workspace's)")
    parser.add_argument("--slots", type=positive_int, default=1,
                        help="jobs at once, one per slot (default 1; at most one per GPU, or per CPU core without GPUs): "
                             "slot i's job gets CUDA_VISIBLE_DEVICES=i, or cores/N CPU threads")
    parser.add_argument("--concurrency", type=positive_int, dest="slots", help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--poll", type=non_negative_float, default=DEFAULT_POLL, help="seconds between queue checks")
    parser.add_argument("--heartbeat-timeout", type=non_negative_float, default=None,
                        help="seconds without a heartbeat before a running job counts as dead "
                             "(default: DEFECTPRUNE_HEARTBEAT_TIMEOUT or 30)")
    parser.add_argument("--stop-grace", type=non_negative_float, default=None,
                        help="seconds a job has to stop before it is killed (default: DEFECTPRUNE_STOP_GRACE or 10)")
    parser.add_argument("--idle-exit", type=non_negative_float, default=None,
                        help="leave after this many seconds without work (default: never)")
    parser.add_argument("--max-jobs", type=positive_int, default=None, help="leave after this many jobs")
    parser.add_argument("--run-job", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.runs.store import Store

    if args.run_job is None:
        slot_plan(args.slots)  # more slots than GPUs (or cores): a one-line error before the store is opened

    store = Store(args.db) if args.db else Store()
    if args.run_job is not None:
        from core.runs.worker import execute_job

        execute_job(store, args.run_job, parent_pid=args.parent_pid)
        return 0
    from core.runs.worker import run_worker

    settings = WorkerSettings(poll_seconds=args.poll, heartbeat_timeout=args.heartbeat_timeout,
                              stop_grace=args.stop_grace, slots=args.slots,
                              idle_exit=args.idle_exit, max_jobs=args.max_jobs)
    return run_worker(store, settings)
