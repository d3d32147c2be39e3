"""The Compare page through AppTest: two models, per-class and per-image changes, cost, downloads."""

from __future__ import annotations

import json

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
