"""Helpers shared by the AppTest page tests."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.models.checkpoint import save_checkpoint
from core.models.zoo import ModelSpec, build_model
from core.runs import api
from core.runs.worker import execute_job

TIMEOUT = 300
STEEL_CLASSES = ["background", "scratch", "inclusion", "patch"]


def open_page(view: str, model: str | None = None, run: bool = True) -> AppTest:
    """The app on ``pages/views/<view>.py``, with ``model`` chosen, run once (exceptions fail)."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.switch_page(f"pages/views/{view}.py")
    if model:
        at.session_state["model"] = model
    if run:
        at.run()
        assert not at.exception, at.exception
    return at


def tiny_steel_model(folder: Path, metrics: dict | None = None) -> str:
    """An untrained 64 px, one-channel Unet-resnet18 for the synthetic steel classes."""
    torch.manual_seed(0)
    spec = ModelSpec(classes=STEEL_CLASSES, input_size=(64, 64), in_channels=1, dataset_format="synthetic-steel",
                     metrics=metrics or {})
    return str(save_checkpoint(folder / "model", build_model(spec).eval(), spec))


def chart_titles(at: AppTest) -> dict[str, dict]:
    """Every plotly figure on the page, by title."""
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["layout"]["title"]["text"]] = spec
    return out


def figure(at: AppTest, title_start: str) -> dict:
    """The plotly figure whose title starts with ``title_start``."""
    for title, spec in chart_titles(at).items():
        if title.startswith(title_start):
            return spec
    raise AssertionError(f"no chart titled {title_start!r} among {list(chart_titles(at))}")


def values(array) -> np.ndarray:
    """Plotly writes numeric arrays as {"dtype", "bdata"} (base64) in figure JSON."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array)


def claim(job_id: int) -> None:
    """Mark a queued job running, as the worker would (the test is its worker)."""
    assert api.open_store().claim_next_job(worker_pid=os.getpid()).id == job_id


def run_inline(job_id: int) -> None:
    """Run a queued job here, as the worker would."""
    claim(job_id)
    store = api.open_store()
    assert execute_job(store, job_id) == "succeeded", store.get_job(job_id).error


def sidebar_text(at: AppTest) -> str:
    return " ".join(m.value for m in at.sidebar.markdown)


def settled(at: AppTest) -> AppTest:
    """Rerun the page until the work it left to the server's background thread
    (`ui.background`: Compare's predictions and cost) has ended and is drawn."""
    from ui import background

    while background.busy():
        background.wait()
        at.run()
        assert not at.exception, at.exception
    return at
