"""The dashboard's server (`ui.serve`) with each script run's answer time written down:
bench/ui_pages.py starts it to report how long the server took to answer (from the browser's
rerun request arriving to the run's "script finished" message leaving), apart from what the
browser, on the same two cores, adds.

    DEFECTPRUNE_RUN_TRACE=trace.txt python -m bench.traced_server [streamlit run options]

Each line of the trace: ``<unix time> request`` or ``<unix time> finished``.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from streamlit.runtime import app_session

TRACE = os.environ["DEFECTPRUNE_RUN_TRACE"]
_lock = threading.Lock()


def _write(event: str) -> None:
    with _lock, open(TRACE, "a", encoding="utf-8") as out:
        out.write(f"{time.time():.6f} {event}\n")


def _traced() -> None:
    handle, flush = app_session.AppSession.handle_backmsg, app_session.AppSession.flush_browser_queue

    def handle_backmsg(self, msg):
        if msg.WhichOneof("type") == "rerun_script":
            _write("request")
        return handle(self, msg)

    def flush_browser_queue(self):
        messages = flush(self)
        if any(m.WhichOneof("type") == "script_finished" for m in messages):
            _write("finished")
        return messages

    app_session.AppSession.handle_backmsg = handle_backmsg
    app_session.AppSession.flush_browser_queue = flush_browser_queue


if __name__ == "__main__":
    _traced()
    from ui import serve

    sys.exit(serve.main())
