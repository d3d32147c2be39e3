"""Issue 13 on the Model page: the train form's precision reaches the train job, and a loaded
checkpoint says which precision it was trained in (older checkpoints say nothing)."""

from __future__ import annotations

import pytest

from core.runs import api
from page_helpers import open_page, tiny_steel_model


@pytest.fixture()
def no_worker(monkeypatch) -> None:
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)


def test_the_train_form_passes_the_precision(no_worker):
    at = open_page("model")
    choice = at.selectbox(key="model_precision")
    assert choice.value == "auto" and list(choice.options) == ["auto", "fp32", "bf16"]
    choice.set_value("bf16")
    at.number_input(key="model_epochs").set_value(1)
    at.button[0].click().run()  # the form's submit button
    assert not at.exception and not at.error
    job = api.get_job(at.session_state["train_job"])
    assert job.kind == "train" and job.params["precision"] == "bf16"
    api.stop(job.id)  # queued: stops at once


def trained_in(at) -> list[str]:
    return [c.value for c in at.caption if c.value.startswith("Trained in")]


def test_a_checkpoint_shows_its_training_precision_and_an_older_one_nothing(tmp_path):
    training = {"precision": "bf16", "memory_format": "channels_last", "epochs_run": 7, "best_epoch": 5}
    new = tiny_steel_model(tmp_path / "new", metrics={"defect_miou": 30.0, "training": training})
    at = open_page("model", model=new)
    assert not at.error
    assert trained_in(at) == ["Trained in bf16 (channels_last memory format), 7 epoch(s), best epoch 5."]
    old = tiny_steel_model(tmp_path / "old", metrics={"defect_miou": 30.0})  # saved before precision was kept
    at.session_state["model"] = old
    at.run()
    assert not at.exception and not at.error
    assert trained_in(at) == []
