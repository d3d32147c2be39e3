"""The Filter correlation page through AppTest."""

from __future__ import annotations

import json

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.models.checkpoint import save_checkpoint
from core.models.zoo import ModelSpec, build_model

TIMEOUT = 180


@pytest.fixture()
def tiny_model(tmp_path) -> str:
    torch.manual_seed(0)
    spec = ModelSpec(classes=["background", "scratch", "inclusion", "patch"], input_size=(64, 64),
                     in_channels=1, dataset_format="synthetic-steel")
    return str(save_checkpoint(tmp_path / "model", build_model(spec).eval(), spec))


def page(model: str | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.switch_page("pages/views/correlation.py")
    if model:
        at.session_state["model"] = model
    at.run()
    assert not at.exception, at.exception
    return at


def titles(at: AppTest) -> dict[str, dict]:
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["layout"]["title"]["text"]] = spec
    return out


def test_without_a_model_the_page_says_what_to_do():
    assert any("No model yet" in info.value for info in page().info)


def test_heatmap_bars_and_selections_follow_the_widgets(tiny_model):
    at = page(tiny_model)
    assert not at.error
    charts = titles(at)
    heat = next(v for k, v in charts.items() if k.startswith("|correlation|"))
    assert heat["data"][0]["type"] == "heatmap"
    assert any(k.startswith("Combined score S = c(1 - 0.5 s)") for k in charts)
    at.slider(key="correlation_beta").set_value(1.0).run()
    assert any(k.startswith("Combined score S = c(1 - 1 s)") for k in titles(at))
    at.selectbox(key="correlation_group").set_value("encoder.layer1.0.conv1").run()
    assert not at.exception and not at.error
    heat = next(v for k, v in titles(at).items() if k.startswith("|correlation|"))
    assert len(heat["data"][0]["x"]) == 64  # that layer's 64 filters
    counts = {m.label: int(m.value) for m in at.metric}
    remove = at.slider(key="correlation_remove").value
    # each method removes exactly the slider's count
    assert counts["Removed by L1 only"] + counts["Removed by both"] == remove
    assert counts["Removed by the method only"] + counts["Removed by both"] == remove
