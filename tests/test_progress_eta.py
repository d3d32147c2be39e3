"""The time a job has left: the pace estimate (`core.progress.estimate_remaining`), its words,
what a job's bar says of its time (`core.runs.jobs.JobTiming`), and the ETA a running job's
context hands the store (`JobContext`: the runner's own, aged; else the pace, kept current)."""

from __future__ import annotations

import math
import time

import pytest

from core.progress import duration_text, estimate_remaining, remaining_text
from core.runs.jobs import JobContext, JobTiming
from core.runs.store import FAILED, QUEUED, RUNNING, STOPPED, SUCCEEDED, JobRecord, Store


# ---------------------------------------------------------------- the pace
def test_the_pace_so_far_gives_the_rest():
    assert estimate_remaining(0.25, 60.0) == pytest.approx(180.0)  # a quarter in a minute: three more
    assert estimate_remaining(0.5, 10.0) == pytest.approx(10.0)
    assert estimate_remaining(1.0, 10.0) == 0.0


def test_a_resumed_attempt_counts_only_what_it_did_itself():
    # from 40% to 60% in 20 s: 40 s for the remaining 40%, not 20 / 0.6 * 0.4
    assert estimate_remaining(0.6, 20.0, start_fraction=0.4) == pytest.approx(40.0)


@pytest.mark.parametrize("fraction, elapsed, start", [
    (0.01, 100.0, 0.0),  # under the few percent the first report often is ("loaded")
    (0.5, 1.0, 0.0),  # a second says nothing of the pace
    (0.41, 60.0, 0.4),  # a resumed job that barely moved
    (0.3, 60.0, 0.4),  # a fraction that went back
    (math.nan, 60.0, 0.0),
    (0.5, math.inf, 0.0),
])
def test_no_estimate_before_the_progress_says_anything(fraction, elapsed, start):
    assert estimate_remaining(fraction, elapsed, start_fraction=start) is None


def test_the_thresholds_are_where_the_estimate_starts():
    assert estimate_remaining(0.02, 3.0) == pytest.approx(3.0 / 0.02 * 0.98)
    assert estimate_remaining(0.019, 3.0) is None
    assert estimate_remaining(0.02, 2.9) is None


# ---------------------------------------------------------------- in words
@pytest.mark.parametrize("seconds, text", [
    (0, "0 s"), (8.4, "8 s"), (59.4, "59 s"), (60, "1 min 00 s"), (125, "2 min 05 s"),
    (3599, "59 min 59 s"), (3600, "1 h 00 min"), (4020, "1 h 07 min"), (-3, "0 s"),
])
def test_durations(seconds, text):
    assert duration_text(seconds) == text


@pytest.mark.parametrize("seconds, text", [
    (None, ""), (-1, ""), (math.nan, ""), (math.inf, ""),
    (0, "a few seconds left"), (14, "a few seconds left"), (15, "about 20 s left"), (44, "about 40 s left"),
    (55, "about 1 min left"), (100, "about 2 min left"), (89 * 60, "about 89 min left"),
    (90 * 60, "about 1 h 30 min left"), (2 * 3600 + 20, "about 2 h left"), (3 * 3600 + 1000, "about 3 h 20 min left"),
])
def test_remaining_in_words(seconds, text):
    assert remaining_text(seconds) == text


# ---------------------------------------------------------------- a job's bar
NOW = 1_000_000.0


def record(state: str = RUNNING, progress: float = 0.0, eta: float | None = None, started: float | None = 60.0,
           finished: float | None = None, attempts: int = 1, stop_requested: bool = False) -> JobRecord:
    """A job row as the store reads it; ``started`` and ``finished`` are seconds before NOW."""
    return JobRecord(id=7, kind="score", params={}, state=state, progress=progress, message="m", eta_seconds=eta,
                     created_at=NOW - 100, started_at=None if started is None else NOW - started,
                     finished_at=None if finished is None else NOW - finished, heartbeat_at=NOW, error=None,
                     stop_requested=stop_requested, stop_requested_at=None, pid=None, worker_pid=None, result=None,
                     out_dir=None, dataset_id=None, attempts=attempts)


def test_a_queued_job_says_it_waits():
    timing = JobTiming.of(record(QUEUED, started=None, attempts=0), NOW)
    assert (timing.elapsed, timing.remaining, timing.text) == (None, None, "waiting for the worker")


def test_a_running_job_with_the_runners_eta_shows_it():
    timing = JobTiming.of(record(progress=0.3, eta=130.0), NOW)
    assert timing.elapsed == pytest.approx(60.0) and timing.remaining == 130.0
    assert timing.text == "1 min 00 s elapsed, about 2 min left"


def test_a_running_job_without_one_gets_the_pace_since_it_started():
    timing = JobTiming.of(record(progress=0.25, started=40.0), NOW)
    assert timing.remaining == pytest.approx(120.0)
    assert timing.text == "40 s elapsed, about 2 min left"


def test_nothing_is_promised_when_it_cannot_be_estimated_honestly():
    # too early, barely moved
    assert JobTiming.of(record(progress=0.5, started=2.0), NOW).text == "2 s elapsed"
    assert JobTiming.of(record(progress=0.01, started=300.0), NOW).text == "5 min 00 s elapsed"
    # a resumed job started part-way: its pace from zero would say it is nearly done
    resumed = JobTiming.of(record(progress=0.6, started=10.0, attempts=2), NOW)
    assert resumed.remaining is None and resumed.text == "10 s elapsed"
    # the runner's estimate ran out while the job goes on
    assert JobTiming.of(record(progress=0.9, eta=0.0), NOW).text == "1 min 00 s elapsed"
    # a stop was asked for: what is left no longer matters
    stopping = JobTiming.of(record(progress=0.5, eta=50.0, stop_requested=True), NOW)
    assert stopping.remaining is None and stopping.text == "1 min 00 s elapsed, stopping"


@pytest.mark.parametrize("state, text", [(SUCCEEDED, "done in 50 s"), (FAILED, "failed after 50 s"),
                                         (STOPPED, "stopped after 50 s")])
def test_a_finished_job_says_how_long_it_ran(state, text):
    timing = JobTiming.of(record(state, progress=1.0, started=60.0, finished=10.0), NOW)
    assert (timing.elapsed, timing.remaining, timing.text) == (pytest.approx(50.0), None, text)


def test_the_bar_says_a_finished_jobs_state_and_time_once():
    from dataclasses import replace

    from ui.jobs import bar_text

    done = replace(record(SUCCEEDED, progress=1.0, started=60.0, finished=10.0), message="done")
    assert bar_text(done, "Training", NOW) == "Training, job 7 (succeeded) · done in 50 s"
    failed = replace(done, state=FAILED, message="out of memory")
    assert bar_text(failed, "Training", NOW) == "Training, job 7 (failed): out of memory · failed after 50 s"
    running = replace(record(progress=0.5, eta=50.0), message="epoch 3/8")
    assert bar_text(running, "Training", NOW).startswith("Training, job 7 (running): epoch 3/8 · ")


def test_a_job_stopped_before_it_started_has_no_time():
    assert JobTiming.of(record(STOPPED, started=None, finished=5.0, attempts=0), NOW).text == ""


# ---------------------------------------------------------------- what a running job writes
@pytest.fixture()
def running(tmp_path) -> tuple[Store, JobContext]:
    store = Store(tmp_path / "runs.db")
    job_id = store.create_job("score", {})
    store.claim_next_job(worker_pid=1)
    yield store, JobContext(store, store.get_job(job_id))
    store.close()


def test_a_runner_without_an_eta_gets_its_pace_and_it_is_kept_current(running, monkeypatch):
    store, ctx = running
    clock = {"now": 100.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    ctx.progress(0.1, "loaded")  # where this attempt starts
    assert ctx.take_pending()["eta_seconds"] is None
    clock["now"] = 110.0
    ctx.progress(0.3, "step 2")  # 20% in 10 s: 35 s for the remaining 70%
    ctx.flush()
    assert store.get_job(ctx.job_id).eta_seconds == pytest.approx(35.0)
    clock["now"] = 130.0  # a long phase with no report: the pace slows with the clock
    pending = ctx.take_pending()
    assert pending["eta_seconds"] == pytest.approx(105.0) and pending["progress"] == 0.3
    assert "message" not in pending  # the last message stays
    clock["now"] = 150.0
    ctx.flush()
    job = store.get_job(ctx.job_id)
    assert job.eta_seconds == pytest.approx(175.0) and job.progress == 0.3 and job.message == "step 2"


def test_the_runners_own_eta_counts_down_until_it_reports_again(running, monkeypatch):
    _store, ctx = running
    clock = {"now": 100.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    ctx.progress(0.5, "epoch 1/2", eta_seconds=60.0)
    assert ctx.take_pending()["eta_seconds"] == 60.0
    clock["now"] = 120.0
    assert ctx.take_pending()["eta_seconds"] == pytest.approx(40.0)
    clock["now"] = 200.0  # it ran out: 0, which the bar reads as no estimate
    assert ctx.take_pending()["eta_seconds"] == 0.0
    ctx.progress(0.6, "epoch 2/2", eta_seconds=30.0)
    assert ctx.take_pending()["eta_seconds"] == 30.0


def test_nothing_is_written_before_the_first_report(running):
    _store, ctx = running
    assert ctx.take_pending() == {}
