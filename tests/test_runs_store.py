"""The run store without running jobs: schema and migrations, job states, stale heartbeats,
parameters as the requests take them, atomic artifacts, and readers beside a busy writer."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from core.runs import api
from core.runs.artifacts import atomic_write_bytes, atomic_write_json
from core.runs.kinds import JobNotResumableError, job_request
from core.runs.store import (
    DB_FILE, FAILED, QUEUED, RUNNING, SCHEMA_VERSION, STOPPED, JobNotFoundError, JobStateError, Store, StoreError,
)
from core.services.prune import PruneRequest
from core.services.request import ParameterError
from core.services.train import SYNTHETIC_TRAINING, TrainRequest

pytestmark = pytest.mark.timeout(120)
V1_SQL = Path(__file__).parent / "fixtures" / "run_store_v1.sql"  # frozen: not the code's V1_SCHEMA


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "ws" / DB_FILE)


def make_v1_database(path: Path) -> None:
    """A workspace file exactly as the first release wrote it, with one job and one dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(V1_SQL.read_text())
    conn.execute("INSERT INTO schema_version (version, applied_at, description) VALUES (1, 0, 'v1')")
    conn.execute("INSERT INTO datasets (format, root, split_seed, options_json, created_at) "
                 "VALUES ('neu-seg', '/data/neu', 0, '{}', 1.0)")
    conn.execute("INSERT INTO jobs (kind, params_json, state, progress, message, created_at, finished_at, out_dir, "
                 "dataset_id) VALUES ('train', '{\"format\": \"neu-seg\"}', 'succeeded', 1, 'done', 1.0, 2.0, "
                 "'runs/1', 1)")
    conn.commit()
    conn.close()


# ---------------------------------------------------------------- schema
def test_new_store_is_wal_at_the_current_version(store):
    assert store.schema_version() == SCHEMA_VERSION == 3
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert int(store.query("PRAGMA busy_timeout")[0][0]) >= 10_000
    versions = [r["version"] for r in store.query("SELECT version FROM schema_version ORDER BY version")]
    assert versions == [1, 2, 3]


def test_opening_a_v1_database_migrates_it_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old" / DB_FILE
    make_v1_database(path)
    store = Store(path)
    assert store.schema_version() == 3
    job = store.get_job(1)
    assert (job.kind, job.state, job.params, job.dataset_id) == ("train", "succeeded", {"format": "neu-seg"}, 1)
    assert job.attempts == 0 and job.metrics == {} and job.worker_pid is None  # the v2 columns, defaulted
    assert job.slot is None  # v3
    assert store.get_dataset(1)["root"] == "/data/neu"
    assert store.query("SELECT COUNT(*) FROM workers")[0][0] == 0
    # the migrated file works like a new one, and opening it again changes nothing
    new_id = store.create_job("evaluate", {"checkpoint": "x"})
    assert new_id == 2 and store.heartbeat(new_id) is True  # not running: the answer is "stop"
    again = Store(path)
    assert again.migrate() == 3
    assert [r["version"] for r in again.query("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3]


def schema_of(store: Store) -> dict[str, list[tuple]]:
    """Every table's and index's columns (name, type, not null, default, key), by name."""
    objects = store.query("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name")
    return {f"{o['type']} {o['name']}": [tuple(r)[1:] for r in store.query(
        f"PRAGMA {'table_info' if o['type'] == 'table' else 'index_info'}({o['name']})")] for o in objects}


def test_a_migrated_v1_database_has_the_schema_of_a_new_one(tmp_path):
    # an edit to the first release's schema in the code (instead of a new migration) makes new
    # workspaces differ from migrated old ones: this notices it
    make_v1_database(tmp_path / "old" / DB_FILE)
    migrated, new = Store(tmp_path / "old" / DB_FILE), Store(tmp_path / "new" / DB_FILE)
    assert schema_of(migrated) == schema_of(new)
    assert "table workers" in schema_of(new) and len(schema_of(new)) >= 9


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new" / DB_FILE
    Store(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version (version, applied_at, description) VALUES (99, 0, 'future')")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99, newer"):
        Store(path)


def test_a_file_that_is_not_a_database_is_a_named_error(tmp_path):
    path = tmp_path / "junk" / DB_FILE
    path.parent.mkdir()
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable run store"):
        Store(path)


# ---------------------------------------------------------------- job states
def test_jobs_are_claimed_oldest_first_and_once(store):
    ids = [store.create_job("evaluate", {"n": i}) for i in range(3)]
    first = store.claim_next_job(worker_pid=1)
    second = store.claim_next_job(worker_pid=1)
    assert (first.id, second.id) == (ids[0], ids[1])
    assert first.state == RUNNING and first.attempts == 1 and first.started_at is not None
    assert [j.id for j in store.list_jobs(states=[QUEUED])] == [ids[2]]


def test_stop_a_queued_job_at_once_and_a_running_one_by_request(store):
    running, queued = store.create_job("train", {}), store.create_job("train", {})
    store.claim_next_job(worker_pid=1)
    stopped = store.request_stop(queued)
    assert stopped.state == STOPPED and stopped.finished_at is not None and stopped.started_at is None
    assert store.claim_next_job(worker_pid=1) is None  # the stopped job never runs
    asked = store.request_stop(running)
    assert asked.state == RUNNING and asked.stop_requested and asked.stop_requested_at is not None
    assert store.heartbeat(running, 0.5, "epoch 1") is True  # the job learns it on its next heartbeat
    assert store.finish_job(running, STOPPED, message="stopped") is True
    assert store.finish_job(running, FAILED, error="late") is False  # an end is recorded once
    assert store.get_job(running).state == STOPPED and store.get_job(running).error is None


def test_resume_only_a_failed_or_stopped_prune_job_which_keeps_its_place(store):
    job_id = store.create_job("prune", {})
    later = store.create_job("evaluate", {})
    with pytest.raises(JobStateError, match="queued"):
        store.requeue(job_id)
    store.claim_next_job(worker_pid=1)
    store.finish_job(job_id, FAILED, error="boom")
    again = api.resume(job_id, store)
    assert again.state == QUEUED and again.error is None and not again.stop_requested
    claimed = store.claim_next_job(worker_pid=1)
    assert (claimed.id, claimed.attempts) == (job_id, 2)  # before the job submitted after it
    assert store.claim_next_job(worker_pid=1).id == later
    with pytest.raises(JobNotFoundError):
        api.resume(999, store)


@pytest.mark.parametrize("kind", ["train", "score", "evaluate", "export"])
def test_resume_refuses_the_kinds_that_would_start_over(store, kind):
    job_id = store.create_job(kind, {})
    store.claim_next_job(worker_pid=1)
    store.finish_job(job_id, FAILED, error="boom")
    with pytest.raises(JobNotResumableError, match=f"job {job_id} is a {kind} job, which cannot be resumed: it would "
                                                   f"start over .* submit a new {kind} job"):
        api.resume(job_id, store)
    job = store.get_job(job_id)
    assert (job.state, job.error, job.attempts) == (FAILED, "boom", 1)  # untouched
    assert store.claim_next_job(worker_pid=1) is None


def test_a_stale_heartbeat_fails_the_job_with_the_time_it_stopped(store):
    alive, dead, mine = (store.create_job("train", {}) for _ in range(3))
    for _ in range(3):
        store.claim_next_job(worker_pid=1)
    old = time.time() - 100
    with store.write() as conn:
        conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE id IN (?, ?)", (old, dead, mine))
    assert store.fail_stale_jobs(30, exclude=[mine]) == [dead]
    failed = store.get_job(dead)
    assert failed.state == FAILED and "worker stopped responding (killed or crashed) at" in failed.error
    assert time.strftime("%Y-%m-%d", time.gmtime(old)) in failed.error
    assert store.get_job(alive).state == RUNNING and store.get_job(mine).state == RUNNING
    # without a live worker the api sweeps too (what the dashboard triggers through ensure_worker)
    assert api.recover_stale_jobs(store, heartbeat_timeout=30) == [mine]
    # a job the user had asked to stop ends "stopped", not failed, when its process is found gone
    asked = store.create_job("train", {})
    store.claim_next_job(worker_pid=1)
    store.request_stop(asked)
    with store.write() as conn:
        conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (old, asked))
    assert store.fail_stale_jobs(30) == [asked]
    assert (store.get_job(asked).state, store.get_job(asked).error) == (STOPPED, None)


def test_progress_and_metrics_round_trip(store):
    job_id = store.create_job("train", {"epochs": 3})
    store.claim_next_job(worker_pid=1)
    assert store.heartbeat(job_id, 1.7, "epoch 2/3", eta_seconds=12.5, metrics={"loss": 0.25}) is False
    job = store.get_job(job_id)
    assert (job.progress, job.message, job.eta_seconds, job.metrics) == (1.0, "epoch 2/3", 12.5, {"loss": 0.25})
    assert job.to_dict()["created_at"].endswith("+00:00")


def test_rounds_are_mirrored_without_duplicates(store, tmp_path):
    job_id = store.create_job("prune", {})
    run_id = store.upsert_prune_run(job_id, tmp_path / "base", store.job_dir(job_id) / "prune", "collaborative", {})
    record = {"round": 1, "accepted": True, "macs": 100, "params": 10, "macs_reduction": 0.3,
              "params_reduction": 0.2, "defect_miou": 50.0, "drop": 0.5, "latency_ms": 1.0, "wall_s": 2.0,
              "checkpoint": str(store.job_dir(job_id) / "prune" / "round_01")}
    assert store.save_rounds(run_id, [record]) == 1
    assert store.save_rounds(run_id, [record, {**record, "round": 2, "macs": 70}]) == 2
    rounds = store.list_rounds(job_id)
    assert [(r["round"], r["macs"]) for r in rounds] == [(1, 100), (2, 70)]
    assert rounds[0]["checkpoint"] == record["checkpoint"]  # stored relative, read back absolute
    assert store.query("SELECT checkpoint FROM rounds WHERE round = 1")[0][0] == f"runs/{job_id}/prune/round_01"


# ---------------------------------------------------------------- parameters
def test_parameters_are_the_requests_fields_as_the_command_takes_them():
    from core.cli import build_parser, request_from_args

    params = {"checkpoint": "/c", "target_macs": 0.5, "no_tolerance_stop": True, "option": {"num_images": 24}}
    argv = ["prune", "--checkpoint", "/c", "--target-macs", "0.5", "--no-tolerance-stop", "--option", "num_images=24",
            "--out", "/o"]
    request = PruneRequest.from_json(params, out="/o")
    assert request == request_from_args(PruneRequest, build_parser().parse_args(argv))
    assert PruneRequest.from_json(request.to_json(), out="/o") == request  # what a job stores reads back the same
    args = TrainRequest.from_json({"format": "synthetic-steel", "epochs": 2, "batch_size": 3}, out="/o")
    # rate and schedule left unset are the format's (core.services.train.recommended_training)
    assert (args.epochs, args.batch_size, args.out, args.lr, args.schedule) == (
        2, 3, "/o", SYNTHETIC_TRAINING["lr"], SYNTHETIC_TRAINING["schedule"])
    with pytest.raises(ParameterError, match="unknown parameter 'epoch' for a train job; known: .*epochs"):
        job_request("train", {"format": "neu-seg", "epoch": 2})
    with pytest.raises(ParameterError, match="unknown parameter 'out'"):
        job_request("prune", {"checkpoint": "/c", "out": "/elsewhere"})
    with pytest.raises(ParameterError, match="required: --format"):
        job_request("train", {})
    with pytest.raises(ParameterError, match="must be between 0 and 1"):
        job_request("prune", {"checkpoint": "/c", "target_macs": 1.5})
    with pytest.raises(ParameterError, match="true or false"):
        job_request("prune", {"checkpoint": "/c", "no_tolerance_stop": "yes"})
    assert job_request("score", {"checkpoint": "/c", "target": 0.4}).target == 0.4
    assert job_request("export", {"checkpoint": "/c", "no_profile": True}).no_profile


@pytest.mark.parametrize("kind, params", [
    ("train", {"format": "synthetic-steel", "option": {"num_images": 24}, "size": 64, "no_augment": True}),
    ("evaluate", {"checkpoint": "/c", "split": "val", "limit": 3}),
    ("prune", {"checkpoint": "/c", "target_params": 0.4, "milestones": [0.2], "recover_lr": 1e-4}),
    ("score", {"checkpoint": "/c", "method": "uniform-l1", "allocator": "sensitivity", "precision": "fp32"}),
    ("export", {"checkpoint": "/c", "opset": 18, "no_profile": True}),
])
def test_every_kind_reads_back_the_json_a_job_stores(kind, params):
    request = job_request(kind, params)
    stored = request.to_json()
    assert job_request(kind, stored) == request and stored == job_request(kind, stored).to_json()
    assert {k: stored[k] for k in params} == {k: [*v] if isinstance(v, list) else str(v) if k == "size" else v
                                             for k, v in params.items()}  # the same keys, as given


def test_submit_checks_parameters_and_takes_the_models_dataset(store, tmp_path):
    with pytest.raises(ParameterError):
        api.submit("train", {"format": "neu-seg", "epochs": 0}, store)
    assert store.list_jobs() == []  # nothing queued for a refused job
    train = api.submit("train", {"format": "synthetic-steel", "root": str(tmp_path / "cache"),
                                 "option": {"num_images": 24, "image_size": 64}}, store)
    checkpoint = store.job_dir(train.id) / "checkpoint"
    store.register_model(checkpoint, job_id=train.id, dataset_id=train.dataset_id, arch="unet")
    prune = api.submit("prune", {"checkpoint": str(checkpoint), "target_macs": 0.5}, store)
    assert prune.params["format"] == "synthetic-steel" and prune.params["root"] == str(tmp_path / "cache")
    assert prune.params["option"] == {"num_images": 24, "image_size": 64}
    assert prune.dataset_id == train.dataset_id
    other = api.submit("evaluate", {"checkpoint": str(checkpoint), "format": "neu-seg", "root": str(tmp_path)}, store)
    assert other.params["format"] == "neu-seg" and other.dataset_id != train.dataset_id


# ---------------------------------------------------------------- artifacts
def test_an_atomic_write_that_fails_halfway_leaves_the_old_file(tmp_path):
    target = atomic_write_json(tmp_path / "report.json", {"version": 1})

    def half_then_full_disk(handle):
        handle.write(b'{"version": 2, "tru')
        raise OSError(28, "No space left on device")

    from core.atomic import write_atomic  # what every artifact writer goes through

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, half_then_full_disk)
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left behind
    atomic_write_bytes(target, b"{}")
    assert target.read_text() == "{}"


# ---------------------------------------------------------------- concurrency
def _busy_writer(db: str, seconds: float, counts) -> None:
    """A worker-like process writing as fast as it can: jobs, heartbeats, rounds, artifacts."""
    store = Store(db)
    job_id = store.create_job("prune", {})
    store.claim_next_job(worker_pid=2)
    run_id = store.upsert_prune_run(job_id, "/base", store.job_dir(job_id), "collaborative", {})
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        store.heartbeat(job_id, (n % 100) / 100, f"step {n}", metrics={"n": n})
        if n % 10 == 0:
            store.save_rounds(run_id, [{"round": n // 10 + 1, "macs": 1, "params": 1, "macs_reduction": 0.1,
                                        "params_reduction": 0.1, "checkpoint": f"/r/{n}"}])
            store.add_artifact("checkpoint", f"/r/{n}", job_id=job_id)
            store.create_job("evaluate", {"n": n})
        n += 1
    counts.value = n


def test_readers_and_writers_beside_a_busy_writer_never_see_a_locked_database(store):
    counts = multiprocessing.get_context("spawn").Value("i", 0)
    writer = multiprocessing.get_context("spawn").Process(target=_busy_writer, args=(str(store.path), 4.0, counts))
    writer.start()
    errors: list[BaseException] = []
    reads = [0]
    stop = threading.Event()

    def dashboard() -> None:
        own = Store(store.path)  # each thread its own connection, as in Streamlit
        try:
            while not stop.is_set():
                for job in api.list_jobs(own, limit=20):
                    api.job_details(job.id, own)
                    reads[0] += 1
                own.list_models()
        except BaseException as exc:
            errors.append(exc)

    def submitter() -> None:
        own = Store(store.path)
        try:
            while not stop.is_set():
                job = own.create_job("train", {"format": "neu-seg"})
                own.request_stop(job)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=dashboard) for _ in range(3)] + [threading.Thread(target=submitter)]
    for t in threads:
        t.start()
    writer.join(timeout=60)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert writer.exitcode == 0
    assert errors == [], errors[:1]
    assert counts.value > 50 and reads[0] > 50  # both sides really ran at the same time
    assert store.query("PRAGMA integrity_check")[0][0] == "ok"


# ---------------------------------------------------------------- command line
def test_jobs_command_lists_shows_stops_and_resumes(store, capsys):
    from core.cli import main

    job_id = store.create_job("prune", {"checkpoint": "/c"})
    db = ["jobs", "--db", str(store.path)]
    assert main([*db, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["id"], j["kind"], j["state"]) for j in listed] == [(job_id, "prune", "queued")]
    assert main([*db, "stop", str(job_id), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "stopped"
    assert main([*db, "resume", str(job_id)]) == 0
    out = capsys.readouterr().out
    assert "queued" in out and "no worker is running" in out
    evaluate = store.create_job("evaluate", {"checkpoint": "/c"})
    store.request_stop(evaluate)
    assert main([*db, "resume", str(evaluate)]) == 2
    assert "cannot be resumed" in capsys.readouterr().err
    assert main([*db, "show", str(job_id), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["folder"].endswith(f"runs/{job_id}") and shown["artifacts"] == []
    assert main([*db, "show", "999"]) == 2
    assert capsys.readouterr().err.startswith("error: there is no job 999")
    assert main([*db, "submit", "train", "--params", '{"format": "neu-seg", "epochs": -1}']) == 2
    assert "train job parameters" in capsys.readouterr().err


# ---------------------------------------------------------------- starting a worker
def test_ensure_worker_starts_one_worker_however_often_the_dashboard_calls_it(store):
    pid = api.ensure_worker(store, idle_exit=0)
    try:
        assert pid
        # a dashboard fragment calls it every 2 s; the worker takes seconds to start (and to
        # take its lock): none of these calls starts a second one
        assert [api.ensure_worker(store) for _ in range(20)] == [None] * 20
    finally:
        os.kill(pid, signal.SIGTERM)
        api._started.pop(store.path)[0].wait(timeout=60)
