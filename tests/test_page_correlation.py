"""The Filter correlation page through AppTest."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from page_helpers import chart_titles, open_page, tiny_steel_model



@pytest.fixture()
def tiny_model(tmp_path) -> str:
    return tiny_steel_model(tmp_path)


def page(model: str | None = None) -> AppTest:
    return open_page("correlation", model)


def titles(at: AppTest) -> dict[str, dict]:
    return chart_titles(at)

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
