"""The Prune page through AppTest: before a model, launching a run, drawing its rounds."""

from __future__ import annotations

import json
import os

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
from core.models.checkpoint import save_checkpoint
from core.models.zoo import ModelSpec, build_model
from core.runs import api
from core.runs.worker import execute_job

TIMEOUT = 180


def page() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.switch_page("pages/views/prune.py")
    return at


@pytest.fixture()
def tiny_model(tmp_path) -> str:
    torch.manual_seed(0)
    spec = ModelSpec(classes=["background", "scratch", "inclusion", "patch"], input_size=(64, 64),
                     in_channels=1, dataset_format="synthetic-steel", metrics={"defect_miou": 20.0})
    return str(save_checkpoint(tmp_path / "model", build_model(spec).eval(), spec))


def test_without_a_model_the_page_says_what_to_do():
    at = page()
    at.run()
    assert not at.exception
    assert any("No model yet" in info.value for info in at.info)


def test_a_launched_run_is_drawn_round_by_round(tiny_model, monkeypatch):
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    at = page()
    at.session_state["model"] = tiny_model
    at.run()
    assert not at.exception and not at.error
    at.selectbox(key="prune_method").set_value("uniform-l1")
    at.slider(key="prune_target").set_value(0.5)
    at.slider(key="prune_step").set_value(0.5)
    at.number_input(key="prune_epochs").set_value(0)
    at.number_input(key="prune_rounds").set_value(1)
    at.button[0].click().run()
    assert not at.exception and not at.error
    job_id = at.session_state["run"]
    job = api.get_job(job_id)
    assert job.kind == "prune" and job.params["method"] == "uniform-l1" and job.params["target_macs"] == 0.5
    store = api.open_store()
    assert store.claim_next_job(worker_pid=os.getpid()).id == job_id
    assert execute_job(store, job_id) == "succeeded", store.get_job(job_id).error
    at.run()
    assert not at.exception and not at.error
    figures = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    titles = [f["layout"]["title"]["text"] for f in figures]
    assert "Validation defect mIoU against MACs, round by round" in titles
    assert "Accuracy against cost, one line per run" in titles
    rounds = figures[titles.index("Validation defect mIoU against MACs, round by round")]["data"][0]
    assert rounds["text"] == ["r0", "r1"]  # the unpruned model, then round 1
