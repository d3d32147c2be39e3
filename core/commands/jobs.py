"""``python -m core jobs list|show ID|stop ID|resume ID|submit KIND [--json]``: the run
store's jobs from the command line (the dashboard's Jobs view, without a browser)."""

from __future__ import annotations

import argparse
import json

from core import safe_json
from core.cli import print_json
from core.runs.kinds import JOB_KINDS, KINDS
from core.runs.store import JOB_STATES, JobRecord, iso_time
from core.services.request import ParameterError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("jobs", help="list, show, stop, resume or submit background jobs")
    parser.add_argument("--db", default=None, help="run store file (default: the workspace's)")
    jobs_sub = parser.add_subparsers(dest="jobs_command", required=True)

    listing = jobs_sub.add_parser("list", help="jobs, newest first")
    listing.add_argument("--state", action="append", choices=JOB_STATES, default=None)
    listing.add_argument("--kind", choices=JOB_KINDS, default=None)
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")

    for name, text in (("show", "one job with its artifacts (and rounds for a prune job)"),
                       ("stop", "stop a queued or running job"),
                       ("resume", "queue a failed or stopped prune job again: it continues after its last finished round "
                                 "(other kinds cannot resume: submit a new job)")):
        command = jobs_sub.add_parser(name, help=text)
        command.add_argument("job_id", type=int, metavar="ID")
        if name == "resume":
            command.add_argument("--start-worker", action="store_true", help="start a worker if none runs")
        command.add_argument("--json", action="store_true")

    submit = jobs_sub.add_parser("submit", help="queue a job; parameters as a JSON object")
    submit.add_argument("kind", choices=JOB_KINDS, help="; ".join(f"{k.name}: {k.description}" for k in KINDS.values()))
    submit.add_argument("--params", default="{}", help='e.g. \'{"checkpoint": "runs/1/checkpoint", "split": "val"}\'')
    submit.add_argument("--start-worker", action="store_true", help="start a worker if none runs")
    submit.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def _line(job: JobRecord) -> str:
    eta = f", ETA {job.eta_seconds:.0f} s" if job.eta_seconds is not None and job.state == "running" else ""
    tail = f" - {job.error}" if job.error else (f" - {job.message}" if job.message else "")
    return f"{job.id:>5}  {job.kind:<8} {job.state:<9} {job.progress:6.1%}{eta}  {iso_time(job.created_at)}{tail}"


def run(args: argparse.Namespace) -> int:
    from core.runs import api

    store = api.open_store(args.db)
    command = args.jobs_command
    if command == "list":
        jobs = api.list_jobs(store, states=args.state, kind=args.kind, limit=args.limit)
        if args.json:
            print_json([job.to_dict() for job in jobs])
            return 0
        if not jobs:
            print(f"no jobs in {store.path}")
        for job in jobs:
            print(_line(job))
        return 0
    if command == "show":
        details = api.job_details(args.job_id, store)
        if args.json:
            print_json(details)
            return 0
        job = api.get_job(args.job_id, store)
        print(_line(job))
        print(f"  folder: {details['folder']}")
        print(f"  params: {json.dumps(job.params)}")
        if job.metrics:
            print(f"  metrics: {json.dumps(job.metrics)}")
        for r in details.get("rounds", []):
            miou = "n/a" if r["defect_miou"] is None else f"{r['defect_miou']:.2f}"
            print(f"  round {r['round']}: MACs -{r['macs_reduction']:.1%}, params -{r['params_reduction']:.1%}, "
                  f"val defect mIoU {miou}{'' if r['accepted'] else ' (reverted)'}  {r['checkpoint']}")
        for a in details["artifacts"]:
            print(f"  {a['kind']}: {a['path']}")
        return 0
    if command == "submit":
        params = safe_json.loads(args.params, "--params", ParameterError)
        if not isinstance(params, dict):
            raise ParameterError(f"--params must be a JSON object of the command's options, e.g. "
                                    f"'{{\"epochs\": 5}}'; not {type(params).__name__}")
        job = api.submit(args.kind, params, store)
    elif command == "stop":
        job = api.stop(args.job_id, store)
    else:
        job = api.resume(args.job_id, store)
    started = api.ensure_worker(store) if getattr(args, "start_worker", False) else None
    if args.json:
        print_json({**job.to_dict(), "worker_started": started})
        return 0
    print(_line(job))
    if job.state == "queued" and started is None and not api.worker_alive(store):
        print("no worker is running: start one with `python -m core worker` (or pass --start-worker)")
    elif started:
        print(f"started a worker (pid {started})")
    return 0
