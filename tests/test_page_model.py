"""The Model page through AppTest: before any model, starting a training job, showing a model."""

from __future__ import annotations

import base64
import json
import os

import numpy as np

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.models.checkpoint import save_checkpoint
from core.models.zoo import ModelSpec, build_model
from core.runs import api

TIMEOUT = 180


def values(array) -> np.ndarray:
    """Plotly writes numeric arrays as {"dtype", "bdata"} (base64) in figure JSON."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array)


@pytest.fixture()
def app() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.switch_page("pages/views/model.py")
    at.run()
    assert not at.exception, at.exception
    return at


def test_without_a_model_the_page_says_what_to_do(app):
    assert app.title[0].value == "Model"
    assert any("No model yet" in info.value for info in app.info)
    assert not app.error


def test_training_starts_a_background_job_with_the_current_dataset(app, monkeypatch):
    started = []
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: started.append(True))
    app.number_input(key="model_epochs").set_value(2)
    app.button[0].click().run()  # the form's submit button
    assert not app.exception and not app.error
    job = api.get_job(app.session_state["train_job"])
    assert job.kind == "train" and job.state == "queued"
    assert job.params["format"] == "synthetic-steel" and job.params["epochs"] == 2
    # what the worker reports is drawn: two epochs of curve
    store = api.open_store()
    assert store.claim_next_job(worker_pid=os.getpid()).id == job.id  # as the worker would
    store.heartbeat(job.id, metrics={"epoch": 2, "curve": [
        {"epoch": 1, "loss": 1.0, "val_defect_miou": 10.0}, {"epoch": 2, "loss": 0.8, "val_defect_miou": 20.0}]})
    app.run()
    curve = json.loads(app.get("plotly_chart")[0].proto.spec)
    assert curve["layout"]["title"]["text"].startswith("Training loss and validation defect mIoU")
    api.stop(job.id)


def test_a_model_shows_its_metrics_and_predictions(app, tmp_path):
    torch.manual_seed(0)
    classes = ["background", "scratch", "inclusion", "patch"]
    spec = ModelSpec(classes=classes, input_size=(128, 128), in_channels=1,
                     metrics={"defect_miou": 42.0, "background_iou": 95.0, "pixel_accuracy": 97.0,
                              "per_class_iou": {"background": 95.0, "scratch": 30.0, "inclusion": 40.0, "patch": 56.0}})
    folder = save_checkpoint(tmp_path / "model", build_model(spec).eval(), spec)
    app.session_state["model"] = str(folder)
    app.run()
    assert not app.exception and not app.error
    chart = json.loads(app.get("plotly_chart")[0].proto.spec)
    assert [bar["name"] for bar in chart["data"]] == ["scratch", "inclusion", "patch"]
    assert [float(values(bar["y"])[0]) for bar in chart["data"]] == [30.0, 40.0, 56.0]
    assert len(app.get("image")) == 8  # 4 ground truths + 4 predictions


def test_a_bad_checkpoint_path_shows_an_error_box(app):
    app.text_input(key="model_path").input("/etc")
    app.button(key="model_load").click().run()
    assert not app.exception
    assert app.error and "outside" in app.error[0].value
