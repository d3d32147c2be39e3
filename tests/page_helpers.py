"""Helpers shared by the AppTest page tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.models.checkpoint import save_checkpoint
from core.models.zoo import ModelSpec, build_model

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


def tiny_steel_model(folder: Path) -> str:
    """An untrained 64 px, one-channel Unet-resnet18 for the synthetic steel classes."""
    torch.manual_seed(0)
    spec = ModelSpec(classes=STEEL_CLASSES, input_size=(64, 64), in_channels=1, dataset_format="synthetic-steel")
    return str(save_checkpoint(folder / "model", build_model(spec).eval(), spec))


def chart_titles(at: AppTest) -> dict[str, dict]:
    """Every plotly figure on the page, by title."""
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["layout"]["title"]["text"]] = spec
    return out
