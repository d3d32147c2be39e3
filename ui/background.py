"""Work of seconds that a page draws once it is done instead of making the user wait for it:
the Compare page's predictions and latency timing run in a thread of the dashboard's server
while the rest of the page is already on screen, with a bar in their place.

Longer work (training, pruning, INT8, scoring: minutes to hours, survives the server) is a
job in the run store (`core.runs`); this is for what a page used to compute in its own run and
keep in Streamlit's cache. One thread runs the tasks in turns (the server's CPU time goes to
one at a time, and a latency measurement is not shared with a prediction). A task is named by
its slot (what the page computes: "compare", "cost") and its key (the inputs: a new key is new
work); the results of the last few keys of each slot are kept, and a new key asked for in the
foreground stops the slot's unfinished work for other keys (the user chose other models).

A task is ``fn(report)``; ``report(fraction, message)`` draws its bar and answers True once it
should stop (``core.train.StopRequested`` or any exception: the task ends, its failure is shown
once in the page's error box and the next page run starts it afresh).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

POLL_SECONDS = 0.5
KEPT_PER_SLOT = 8  # finished results kept per slot (a few model pairs and splits)

Report = Callable[[float, str], bool]


@dataclass
class Task:
    future: Future
    started: float = field(default_factory=time.monotonic)
    fraction: float = 0.0
    message: str = ""
    stop: threading.Event = field(default_factory=threading.Event)

    def report(self, fraction: float, message: str) -> bool:
        self.fraction, self.message = min(max(float(fraction), 0.0), 1.0), message
        return self.stop.is_set()

    @property
    def stale(self) -> bool:
        """Stopped for another key (cancelled while queued, or ended once asked to stop)."""
        return self.future.cancelled() or (self.stop.is_set() and self.future.done()
                                              and self.future.exception() is not None)


_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="defectprune-page-work")
_tasks: OrderedDict[tuple[str, str], Task] = OrderedDict()
_lock = threading.Lock()


def submit(slot: str, key: str, fn: Callable[[Report], Any], foreground: bool = True) -> Task:
    """The task for ``(slot, key)``: the one already asked for (running, queued, done or
    failed), or a new one queued where there is none or it was stopped. ``foreground``: the
    page waits for this one, so the slot's unfinished tasks for other keys stop."""
    with _lock:
        task = _tasks.get((slot, key))
        if task is None or task.stale:
            task = Task(future=Future())
            task.future = _executor.submit(fn, task.report)
            _tasks[(slot, key)] = task
        _tasks.move_to_end((slot, key))
        if foreground:
            for (other_slot, other_key), other in _tasks.items():
                if other_slot == slot and other_key != key and not other.future.done():
                    other.stop.set()
                    other.future.cancel()
        _trim(slot)
        return task


def _trim(slot: str) -> None:
    finished = [k for k, t in _tasks.items() if k[0] == slot and t.future.done()]
    for k in finished[:-KEPT_PER_SLOT]:
        del _tasks[k]


def result(slot: str, key: str, fn: Callable[[Report], Any], what: str) -> Any | None:
    """``fn``'s result for ``key`` when it is done; until then None, with a bar saying ``what``
    (and the task's own progress) that reruns the page once the task ends. A task that failed
    raises its exception here, once (the page's error box shows it); the next call runs it again."""
    task = submit(slot, key, fn)
    if task.future.done():
        error = task.future.exception()
        if error is not None:
            forget(slot, key)
            raise error
        return task.future.result()
    st.fragment(_poll, run_every=POLL_SECONDS)(slot, key, what)
    return None


def prefetch(slot: str, key: str, fn: Callable[[Report], Any]) -> None:
    """Start ``fn`` for ``key`` after the work already queued, for a page run that may want it
    next (the other split): asked for later, its result is ready or under way."""
    submit(slot, key, fn, foreground=False)


def _poll(slot: str, key: str, what: str) -> None:
    with _lock:
        task = _tasks.get((slot, key))
    if task is None or task.future.done():
        st.rerun()  # the whole page: it draws the result (or the failure) in the bar's place
    elapsed = time.monotonic() - task.started
    detail = f": {task.message}" if task.message else ""
    st.progress(task.fraction, text=f"{what}{detail} · {elapsed:.0f} s")


def forget(slot: str, key: str) -> None:
    with _lock:
        _tasks.pop((slot, key), None)


def busy() -> bool:
    """Whether any task asked for has not ended yet."""
    with _lock:
        return any(not t.future.done() for t in _tasks.values())


def wait(timeout: float = 300.0) -> None:
    """Until every task asked for so far has ended (tests: a page run after this draws them)."""
    deadline = time.monotonic() + timeout
    while True:
        with _lock:
            pending = [t.future for t in _tasks.values() if not t.future.done()]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} background task(s) still running after {timeout:.0f} s")
        futures.wait(pending, timeout=max(deadline - time.monotonic(), 0.001))


def clear() -> None:
    """Forget every result (tests: a monkeypatched measurement must not stand in for another)."""
    wait()
    with _lock:
        _tasks.clear()
