"""ui.background: the server thread that runs a page's seconds of work while the page is drawn."""

from __future__ import annotations

import threading

import pytest

from core.train import StopRequested
from ui import background


@pytest.fixture(autouse=True)
def fresh():
    background.clear()
    yield
    background.clear()


def test_a_result_is_computed_once_per_key_and_kept():
    calls = []

    def work(report):
        calls.append(1)
        report(0.5, "half")
        return len(calls)

    background.submit("slot", "a", work)
    background.wait()
    assert background.result("slot", "a", work, "working") == 1
    assert background.result("slot", "a", work, "working") == 1  # kept: not computed again
    assert len(calls) == 1


def test_a_failure_is_raised_once_then_the_work_is_tried_again():
    attempts = []

    def flaky(_report):
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("No space left on device")
        return "ok"

    background.submit("slot", "k", flaky)
    background.wait()
    with pytest.raises(OSError, match="No space left"):
        background.result("slot", "k", flaky, "working")
    background.submit("slot", "k", flaky)  # the next page run asks again
    background.wait()
    assert background.result("slot", "k", flaky, "working") == "ok" and len(attempts) == 2


def test_a_new_key_in_the_foreground_stops_the_slots_other_work():
    started, release = threading.Event(), threading.Event()

    def slow(report):
        started.set()
        release.wait(10)
        if report(0.5, "checking"):
            raise StopRequested("stopped")
        return "slow done"

    queued = []
    background.submit("compare", "old pair", slow)
    started.wait(10)
    background.submit("compare", "older pair", lambda _r: queued.append(1))  # queued behind it
    background.submit("compare", "new pair", lambda _r: "new done")  # the user chose other models
    release.set()
    background.wait()
    assert background.result("compare", "new pair", lambda _r: None, "x") == "new done"
    assert not queued  # the queued one was cancelled, never ran
    # the stopped one is not a failure to show: asked for again, it is computed afresh
    background.submit("compare", "old pair", lambda _r: "again")
    background.wait()
    assert background.result("compare", "old pair", lambda _r: None, "x") == "again"


def test_a_prefetch_does_not_stop_the_work_the_page_waits_for():
    release = threading.Event()
    background.submit("compare", "val", lambda _r: release.wait(10) and "val")
    background.prefetch("compare", "test", lambda _r: "test")
    assert background.busy()
    release.set()
    background.wait()
    assert not background.busy()
    assert background.result("compare", "val", lambda _r: None, "x") == "val"
    assert background.result("compare", "test", lambda _r: None, "x") == "test"


def test_only_the_last_results_of_a_slot_are_kept():
    for i in range(background.KEPT_PER_SLOT + 3):
        background.submit("cost", str(i), lambda _r, i=i: i)
        background.wait()
    recomputed = background.submit("cost", "0", lambda _r: "recomputed")
    background.wait()
    assert recomputed.future.result() == "recomputed"  # the oldest was dropped
    assert background.submit("cost", str(background.KEPT_PER_SLOT + 2), lambda _r: "x").future.result() == \
        background.KEPT_PER_SLOT + 2
