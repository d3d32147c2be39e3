"""The Compare page through AppTest: two models, per-class and per-image changes, cost, downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.models.checkpoint import save_checkpoint
from core.models.zoo import ModelSpec, build_model
from core.pruning.methods import resolve_method
from core.pruning.step import prune_step

TIMEOUT = 300
CLASSES = ["background", "scratch", "inclusion", "patch"]


@pytest.fixture(autouse=True)
def own_workspace(tmp_path, monkeypatch):
    """A run store of its own: other tests register models in the session's store."""
    monkeypatch.setenv("DEFECTPRUNE_WORKSPACE", str(tmp_path / "workspace"))


def page() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.switch_page("pages/views/compare.py")
    return at


def test_with_one_model_the_page_says_what_to_do():
    at = page()
    at.run()
    assert not at.exception
    assert any("needs two models" in info.value for info in at.info)


def test_two_models_are_compared_with_cost_and_downloads(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(classes=CLASSES, input_size=(64, 64), in_channels=1, dataset_format="synthetic-steel")
    model = build_model(spec).eval()
    before = save_checkpoint(tmp_path / "before", model, spec)
    batches = [(torch.randn(2, 1, 64, 64), torch.randint(0, 4, (2, 64, 64)))]
    step = prune_step(model, (64, 64), 1, resolve_method("uniform-l1"), 0.5, batches, CLASSES)
    after = save_checkpoint(tmp_path / "after", model, spec, step.history)
    at = page()
    at.session_state["model"] = str(before)
    at.run()
    assert any("needs two models" in info.value for info in at.info)  # one model is not a comparison
    from core.runs import api

    store = api.open_store()
    store.register_model(after, arch="unet", encoder="resnet18", pruned=True)
    at.run()
    assert not at.exception and not at.error, at.error
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("IoU per defect class") for t in titles)
    assert any(t.startswith("Image ") for t in titles)
    cost = at.table[0].value
    assert list(cost.index) == ["before", "after"]
    assert cost["MACs (M)"].iloc[1] < cost["MACs (M)"].iloc[0]
    assert (cost["ONNX Runtime ms"] > 0).all()
    assert len(at.get("download_button")) == 3


# ---------------------------------------------------------------- bad input
def saved(folder, classes=CLASSES, size=(64, 64)) -> str:
    torch.manual_seed(0)
    spec = ModelSpec(classes=classes, input_size=size, in_channels=1, dataset_format="synthetic-steel")
    return str(save_checkpoint(folder, build_model(spec).eval(), spec))


def two_models_page(before: str, after: str) -> AppTest:
    from core.runs import api

    store = api.open_store()
    for path in (before, after):
        store.register_model(path, arch="unet", encoder="resnet18")
    at = page()
    at.session_state["model"] = before
    at.run()
    return at


@pytest.mark.parametrize("other, expected", [
    ({"classes": ["background", "crack"]}, "differ in classes"),
    ({"size": (96, 96)}, "input size (64, 64) against (96, 96)"),
])
def test_models_that_cannot_be_compared_are_refused_by_name(tmp_path, other, expected):
    before = saved(tmp_path / "before")
    after = saved(tmp_path / "after", **other)
    at = two_models_page(before, after)
    at.selectbox(key="compare_before").set_value(before)
    at.selectbox(key="compare_after").set_value(after).run()
    assert not at.exception
    assert at.error and expected in at.error[0].value, [e.value for e in at.error]
    assert not at.get("plotly_chart")  # nothing drawn from a meaningless comparison
    assert at.selectbox(key="compare_before").value == before
    assert at.selectbox(key="compare_after").value == after
    assert at.session_state["model"] == before


def test_a_model_whose_checkpoint_was_damaged_shows_an_error(tmp_path):
    before = saved(tmp_path / "before")
    after = saved(tmp_path / "after")
    weights = Path(after, "weights.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    at = two_models_page(before, after)
    at.selectbox(key="compare_after").set_value(after).run()
    assert not at.exception
    assert at.error and "not a readable safetensors file" in at.error[0].value, [e.value for e in at.error]
    assert at.selectbox(key="compare_after").value == after
    Path(after).rename(tmp_path / "moved")  # then the folder went away altogether
    at.run()
    assert not at.exception
    assert at.error and f"checkpoint folder {after} does not exist" in at.error[0].value
