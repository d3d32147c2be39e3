"""Start the dashboard (`python -m ui.serve`: `streamlit run app.py` with the engine preloaded)
on a local port and wait until it answers: the one way bench/ui_pages.py and
tests/test_browser.py start the server they drive a browser at."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class DashboardStartError(RuntimeError):
    """The dashboard did not answer its health endpoint in time (or exited first)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_streamlit(port: int, env: Mapping[str, str], timeout: float = 90.0,
                    module: str = "ui.serve") -> tuple[subprocess.Popen, str]:
    """The dashboard's server (`ui.serve`, as scripts/dashboard starts it) headless on
    ``port`` with ``env``, in its own process group
    (stop it with ``os.killpg(process.pid, 9)``), once ``/_stcore/health`` answers 200.
    Returns the process and the dashboard's URL; a server that exits or stays silent for
    ``timeout`` seconds is killed and raises `DashboardStartError`. ``module``: another
    entry point wrapping ui.serve (bench/traced_server.py)."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--server.port", str(port), "--server.headless", "true",
         "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise DashboardStartError(f"the dashboard exited with code {process.returncode} before it answered")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                return process, url
        except OSError:
            time.sleep(0.5)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    raise DashboardStartError(f"the dashboard did not start within {timeout:.0f} s")
