"""The Model page through AppTest: before any model, starting a training job, showing a model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
import core.predictions
from core.models.checkpoint import WEIGHTS_FILE, save_checkpoint
from core.models.zoo import ModelSpec, build_model
from core.runs import api
from page_helpers import figure, open_page, sidebar_text, tiny_steel_model, values

TIMEOUT = 180


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
    store.heartbeat(job.id, metrics={"epoch": 2, "loss": 0.8, "val_defect_miou": 20.0, "curve": [
        {"epoch": 1, "loss": 1.0, "val_defect_miou": 10.0}, {"epoch": 2, "loss": 0.8, "val_defect_miou": 20.0}]})
    app.run()
    curve = json.loads(app.get("plotly_chart")[0].proto.spec)
    assert curve["layout"]["title"]["text"].startswith("Training loss and validation defect mIoU")
    # two panels, each with its own y axis showing numbers; whole epochs on x
    assert [t["xaxis"] for t in curve["data"]] == ["x", "x2"] and [t["yaxis"] for t in curve["data"]] == ["y", "y2"]
    layout = curve["layout"]
    assert layout["yaxis2"].get("showticklabels", True) and "matches" not in layout["yaxis2"]
    assert layout["yaxis"]["title"]["text"] == "loss" and layout["yaxis2"]["title"]["text"] == "defect mIoU (%)"
    assert layout["xaxis"]["dtick"] == 1 and layout["xaxis2"]["tickmode"] == "linear"
    assert [m.value for m in app.metric] == ["2", "0.8000", "20.0"]
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


def test_a_checkpoint_whose_save_was_killed_between_its_renames_is_put_back(app, tmp_path):
    """A save killed after moving the old checkpoint aside and before renaming the new one in
    leaves .NAME.old-*: the page puts it back instead of saying the model is gone."""
    spec = ModelSpec(classes=["background", "scratch"], input_size=(64, 64), in_channels=1)
    folder = save_checkpoint(tmp_path / "model", build_model(spec).eval(), spec)
    os.rename(folder, tmp_path / ".model.old-0000abcd")
    app.session_state["model"] = str(folder)
    app.run()
    assert not app.exception and not app.error
    assert (folder / "weights.safetensors").is_file() and not (tmp_path / ".model.old-0000abcd").exists()


def test_the_split_and_the_number_of_images_change_the_prediction_chart(app, tmp_path):
    app.session_state["model"] = tiny_steel_model(tmp_path)
    app.run()
    assert not app.exception and not app.error

    def shown() -> tuple[str, list]:
        spec = figure(app, "IoU per defect class on these")
        truth_pixels = [int(values(trace["customdata"])[0]) for trace in spec["data"]]  # hover: pixels in truth
        return spec["layout"]["title"]["text"], truth_pixels

    title, four = shown()
    assert title == "IoU per defect class on these 4 val images (%)"
    assert "#### Predictions on validation images" in [m.value for m in app.markdown]
    app.slider(key="model_preview_count").set_value(8).run()
    title, eight = shown()
    assert title == "IoU per defect class on these 8 val images (%)" and eight != four
    assert len(app.get("image")) == 16
    app.selectbox(key="model_preview_split").set_value("test").run()
    assert not app.exception and not app.error
    title, test = shown()
    assert title == "IoU per defect class on these 8 test images (%)" and test != eight
    assert "#### Predictions on test images" in [m.value for m in app.markdown]


def test_a_rerun_shows_the_preview_without_predicting_again(app, tmp_path, monkeypatch):
    """The preview is cached by the checkpoint, its weights' version, the dataset, split and
    count: a rerun redraws it from memory; another count, or re-saved weights, predict again."""
    calls = []
    predict = core.predictions.predict_split
    monkeypatch.setattr(core.predictions, "predict_split", lambda *a, **k: calls.append(1) or predict(*a, **k))
    model = tiny_steel_model(tmp_path)
    app.session_state["model"] = model
    app.run()
    assert not app.exception and not app.error
    assert len(calls) == 1 and len(app.get("image")) == 8
    first = figure(app, "IoU per defect class on these")
    app.run()  # a rerun, as any widget makes
    assert not app.exception and not app.error
    assert len(calls) == 1 and len(app.get("image")) == 8
    assert figure(app, "IoU per defect class on these") == first
    app.slider(key="model_preview_count").set_value(2).run()
    assert len(calls) == 2 and len(app.get("image")) == 4
    app.slider(key="model_preview_count").set_value(4).run()
    assert len(calls) == 2 and len(app.get("image")) == 8
    weights = os.path.join(model, WEIGHTS_FILE)  # the model re-saved at the same path
    later = os.stat(weights).st_mtime + 10
    os.utime(weights, (later, later))
    app.run()
    assert not app.exception and not app.error
    assert len(calls) == 3 and len(app.get("image")) == 8


def test_a_bad_checkpoint_path_shows_an_error_box(app):
    app.text_input(key="model_path").input("/etc")
    app.button(key="model_load").click().run()
    assert not app.exception
    assert app.error and "outside" in app.error[0].value


def test_a_job_id_that_is_not_a_number_is_an_error_box():
    at = open_page("model", run=False)
    at.query_params["job"] = "abc"
    at.run()
    assert not at.exception
    assert at.error and "?job=abc in the address is not a job id" in at.error[0].value
    assert at.button[0]  # the training form is still there


def test_a_reopened_tab_finds_the_training_job_and_its_dataset(monkeypatch):
    started = []
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: started.append(True))
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: False)
    job = api.submit("train", {"format": "synthetic-tile", "size": "64", "epochs": 1})
    at = open_page("model", run=False)
    at.query_params["job"] = str(job.id)  # nothing in the session
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["dataset"]["format"] == "synthetic-tile"
    assert "synthetic-tile" in sidebar_text(at)
    assert any(f"job {job.id} (queued)" in p.proto.text for p in at.get("progress"))
    assert started  # queued with no worker alive (a restarted server): one is started
    at.button(key=f"stop_{job.id}").click().run()
    assert not at.exception and not at.error
    assert api.get_job(job.id).state == "stopped"  # a queued job stops at once


def test_a_store_read_that_fails_inside_the_training_fragment_is_an_error_box(monkeypatch):
    job = api.submit("train", {"format": "synthetic-steel", "size": "64", "epochs": 1})

    def unreadable(*_args, **_kwargs):
        raise OSError("worker lock unreadable")

    monkeypatch.setattr(api, "worker_alive", unreadable)
    at = open_page("model", run=False)
    at.session_state["train_job"] = job.id
    at.run()
    assert not at.exception
    assert any("Reading the training job failed unexpectedly (OSError: worker lock unreadable)" in e.value
               for e in at.error)
    api.stop(job.id)


def broken_checkpoint(folder) -> str:
    """A checkpoint folder whose weights file is not safetensors (a copy cut short)."""
    spec = ModelSpec(classes=["background", "scratch", "inclusion", "patch"], input_size=(64, 64), in_channels=1)
    path = save_checkpoint(folder, build_model(spec).eval(), spec)
    (path / "weights.safetensors").write_bytes(b"not safetensors")
    return str(path)


@pytest.mark.parametrize("how", ["typed path", "missing folder"])
def test_a_checkpoint_that_fails_to_load_is_one_error_and_the_working_model_stays(app, tmp_path, how):
    working = tiny_steel_model(tmp_path)
    app.session_state["model"] = working
    app.run()
    assert not app.exception and not app.error
    bad = broken_checkpoint(tmp_path / "broken") if how == "typed path" else str(tmp_path / "gone")
    app.text_input(key="model_path").input(bad)
    app.button(key="model_load").click().run()
    assert not app.exception
    assert len(app.error) == 1 and app.error[0].value.startswith("Loading the checkpoint failed")
    assert app.session_state["model"] == working
    assert "model" in sidebar_text(app) and "broken" not in sidebar_text(app) and "gone" not in sidebar_text(app)
    assert len(app.get("image")) == 8  # the working model's predictions are still drawn


def test_the_training_form_defaults_are_the_requests(app, monkeypatch):
    """One place for defaults: the form shows TrainRequest's and, for the epochs, the dataset
    format's (`recommended_training`; here both changed under it)."""
    import dataclasses

    from core.services.train import SYNTHETIC_TRAINING, TrainRequest

    fields = {f.name: f for f in dataclasses.fields(TrainRequest)}
    monkeypatch.setitem(SYNTHETIC_TRAINING, "epochs", 7)
    monkeypatch.setattr(fields["batch_size"], "default", 5)
    at = open_page("model")
    assert at.number_input(key="model_epochs").value == 7
    assert at.number_input(key="model_batch").value == 5


def finish_training(job_id: int, checkpoint: str, state: str = "succeeded") -> None:
    """The worker's end of a training job that saved ``checkpoint``."""
    store = api.open_store()
    if store.get_job(job_id).state == "queued":
        assert store.claim_next_job(worker_pid=os.getpid()).id == job_id
    store.finish_job(job_id, state, result={"checkpoint": checkpoint})


def start_training(at: AppTest) -> int:
    at.number_input(key="model_epochs").set_value(1)
    at.button[0].click().run()  # the form's submit button
    assert not at.exception and not at.error
    return at.session_state["train_job"]


@pytest.mark.parametrize("state", ["succeeded", "stopped"])
def test_a_finished_training_jobs_model_becomes_the_workspaces_model(app, tmp_path, monkeypatch, state):
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)
    job_id = start_training(app)
    trained = tiny_steel_model(tmp_path)
    finish_training(job_id, trained, state)
    app.run()
    assert not app.exception and not app.error
    assert app.session_state["model"] == trained  # no "Use this model" press
    assert any("is now the workspace's model" in s.value for s in app.success)
    assert not any("No model yet" in info.value for info in app.info)
    assert "none yet (Model page)" not in sidebar_text(app) and "model" in sidebar_text(app)
    assert not [b for b in app.button if b.key == f"use_{job_id}"]
    # once: a model picked afterwards is not replaced by the same job again
    other = tiny_steel_model(tmp_path / "other")
    app.session_state["model"] = other
    app.run()
    assert not app.exception and app.session_state["model"] == other
    assert app.button(key=f"use_{job_id}")  # offered, not forced


def test_a_model_picked_while_training_is_not_replaced(app, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)
    job_id = start_training(app)
    picked = tiny_steel_model(tmp_path / "picked")
    app.session_state["model"] = picked
    finish_training(job_id, tiny_steel_model(tmp_path / "trained"))
    app.run()
    assert not app.exception and not app.error
    assert app.session_state["model"] == picked
    app.button(key=f"use_{job_id}").click().run()  # "Use this model" is still there for it
    assert not app.exception and app.session_state["model"] == str(tmp_path / "trained" / "model")


def test_a_finished_training_job_in_the_address_gives_a_tab_without_a_model_its_model(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    job = api.submit("train", {"format": "synthetic-steel", "size": "64", "epochs": 1})
    trained = tiny_steel_model(tmp_path)
    finish_training(job.id, trained)
    at = open_page("model", run=False)
    at.query_params["job"] = str(job.id)
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["model"] == trained


def test_a_listed_model_that_fails_to_load_is_one_error_and_the_working_model_stays(tmp_path):
    working = tiny_steel_model(tmp_path)
    bad = broken_checkpoint(tmp_path / "listed-broken")
    api.open_store().register_model(bad, arch="unet", encoder="resnet18")
    at = open_page("model", model=working)
    listed = next(m["path"] for m in api.list_models() if "listed-broken" in m["path"])
    at.selectbox(key="model_pick").set_value(listed)
    at.button(key="model_use_listed").click().run()
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("Loading the checkpoint failed")
    assert at.session_state["model"] == working and "listed-broken" not in sidebar_text(at)
