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


# ---------------------------------------------------------------- bad input
def test_a_run_in_the_address_that_does_not_exist_is_an_error_and_the_form_stays(tiny_model):
    at = page()
    at.session_state["model"] = tiny_model
    at.query_params["run"] = "98765"
    at.run()
    assert not at.exception
    assert at.error and "there is no job 98765" in at.error[0].value, [e.value for e in at.error]
    assert at.selectbox(key="prune_method").value  # the form is still there to launch one
    at.query_params["run"] = "12abc"
    at.run()
    assert not at.exception
    assert at.error and "?run=12abc in the address is not a job id" in at.error[0].value
    assert at.session_state["model"] == tiny_model


def test_a_job_that_is_not_a_prune_run_is_refused_by_name(tiny_model):
    job = api.submit("score", {"checkpoint": tiny_model})
    api.stop(job.id)  # a queued job stops at once: no worker of the session's store runs it
    at = page()
    at.session_state["model"] = tiny_model
    at.query_params["run"] = str(job.id)
    at.run()
    assert not at.exception
    assert at.error and f"job {job.id} is a score job, not a prune run" in at.error[0].value


def test_a_failed_run_says_why_and_offers_to_resume(tiny_model, tmp_path):
    # the dataset folder vanished before the worker read it
    job = api.submit("prune", {"checkpoint": tiny_model, "method": "uniform-l1", "format": "neu-seg",
                               "root": str(tmp_path / "vanished"), "max_rounds": 1, "finetune_epochs": 0})
    store = api.open_store()
    assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
    assert execute_job(store, job.id) == "failed"
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job.id
    at.run()
    assert not at.exception
    assert at.error and "The run failed" in at.error[0].value and "vanished" in at.error[0].value
    assert [b for b in at.button if b.key == f"resume_{job.id}"]
    assert at.session_state["run"] == job.id and at.session_state["model"] == tiny_model
