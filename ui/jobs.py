"""Following a background job on a page: a fragment that re-reads it from the run store."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from core.runs import api
from core.runs.jobs import JobTiming
from core.runs.store import SUCCEEDED, JobRecord
from ui.state import error_box

POLL_SECONDS = 2.0


def follow_job(job: JobRecord, action: str, draw: Callable[[JobRecord], None]) -> None:
    """Draw ``draw(job)`` in a fragment that re-reads the job from the run store every two
    seconds while it is queued or running (it runs in the worker, not in this page), and
    not at all once it is final. When the job reaches a final state, or leaves one (a
    resume), the whole page reruns: it draws around the new state and the polling stops or
    starts with it."""
    st.fragment(_follow, run_every=None if job.finished else POLL_SECONDS)(job.id, job.finished, action, draw)


def _follow(job_id: int, was_finished: bool, action: str, draw: Callable[[JobRecord], None]) -> None:
    # The error box is in here, not around the call: the fragment's timed reruns and the
    # buttons drawn in it run this function alone, without the page around it.
    with error_box(action):
        job = api.get_job(job_id)
        if not job.finished and not api.worker_alive():
            # a restarted server or container left the job waiting on a worker that is gone:
            # a new one first marks failed the jobs that died with the old one, then runs the queue
            api.ensure_worker()
            job = api.get_job(job_id)
        if job.finished != was_finished:
            st.rerun()
        draw(job)


def job_bar(job: JobRecord, what: str, stoppable: bool = False) -> None:
    """The job's progress bar (full once it succeeded) with its latest message and its time:
    elapsed and, when its progress supports an estimate, the time left (`JobTiming`). With
    ``stoppable``, the job's Stop button under it (`stop_button`)."""
    fraction = 1.0 if job.state == SUCCEEDED else min(max(job.progress, 0.0), 1.0)
    st.progress(fraction, text=bar_text(job, what))
    if stoppable:
        stop_button(job)


def bar_text(job: JobRecord, what: str, now: float | None = None) -> str:
    """``what``, the job, its state, its latest message and its time (`JobTiming`); a finished
    job's last message ("done") is left out where the state and the time already say it."""
    timing = JobTiming.of(job, now).text
    message = job.message if job.message and not (job.finished and job.message in ("done", job.state)) else ""
    text = f"{what}, job {job.id} ({job.state})" + (f": {message}" if message else "")
    return f"{text} · {timing}" if timing else text


def stop_button(job: JobRecord, label: str = "Stop",
                requested: str = "Stop requested: the job stops within seconds.") -> None:
    """A button that stops an unfinished job (a queued one at once, a running one within
    seconds), then reruns the page; once asked, ``requested`` in its place. Nothing for a
    finished job. In a `follow_job` fragment the page reruns again when the job ends."""
    if job.finished:
        return
    if job.stop_requested:
        st.caption(requested)
    elif st.button(label, key=f"stop_{job.id}"):
        api.stop(job.id)
        st.rerun()
