"""The workspace in the address (issue 16): every run writes the dataset, model and run into
the query parameters, and a fresh session (F5, a shared link) reopens them; a bad or outside
value there is one error box and the default workspace."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.config import workspace_dir
from core.data.registry import DEFAULT_FORMAT
from core.runs import api
from page_helpers import open_page, sidebar_text, tiny_steel_model
from ui.state import DatasetChoice


@pytest.fixture(scope="module")
def workspace_model() -> str:
    """A checkpoint inside the workspace (the address names it relative to the workspace)."""
    folder = workspace_dir() / "address-test"
    return tiny_steel_model(folder)


def neu_folder(root: Path) -> Path:
    """A three-image NEU-Seg folder (inside a data root: the tests' temporary folder)."""
    for split in ("train", "val", "test"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        cv2.imwrite(str(root / "img_dir" / split / "000001.jpg"), np.full((32, 32), 120, np.uint8))
        cv2.imwrite(str(root / "ann_dir" / split / "000001.png"), np.zeros((32, 32), np.uint8))
    return root


def refreshed(view: str, address: dict) -> object:
    """A new session (F5 or a shared link) on ``view`` with ``address`` as its query parameters."""
    at = open_page(view, run=False)
    for key, value in address.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def test_a_refresh_reopens_the_dataset_and_model_in_the_address(workspace_model, tmp_path):
    root = neu_folder(tmp_path / "neu")
    at = open_page("data", run=False)
    at.session_state["dataset"] = asdict(DatasetChoice(format="neu-seg", root=str(root), seed=3))
    at.session_state["model"] = workspace_model
    at.run()
    assert not at.exception and not at.error
    address = dict(at.query_params)
    assert address["format"] == "neu-seg" and address["root"] == str(root) and address["seed"] == "3"
    assert address["model"] == "address-test/model"  # relative to the workspace, where it lies

    at = refreshed("data", address)
    assert not at.error
    assert at.session_state["dataset"] == asdict(DatasetChoice(format="neu-seg", root=str(root), seed=3))
    assert Path(at.session_state["model"]) == Path(workspace_model).resolve()
    assert f"neu-seg ({root})" in sidebar_text(at) and "address-test/model" in sidebar_text(at)
    assert at.subheader[0].value == f"neu-seg ({root})"  # the page shows the restored dataset


def test_a_refreshed_model_page_shows_the_model_again(workspace_model):
    at = refreshed("model", {"format": "synthetic-steel", "seed": "0", "model": "address-test/model"})
    assert not at.error
    assert not any("No model yet" in info.value for info in at.info)
    assert len(at.get("image")) == 8  # its predictions beside the ground truth


def test_the_run_and_the_pages_own_job_stay_in_the_address(workspace_model, monkeypatch):
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)
    run = api.submit("prune", {"checkpoint": workspace_model, "method": "uniform-l1"})
    train = api.submit("train", {"format": "synthetic-steel", "size": "64", "epochs": 1})
    try:
        at = refreshed("model", {"job": str(train.id), "run": str(run.id), "format": "synthetic-steel",
                                 "model": "address-test/model"})
        assert not at.error
        assert at.session_state["run"] == run.id  # the run named beside the page's own job
        assert f"#{run.id} uniform-l1" in sidebar_text(at)
        assert at.query_params["job"] == str(train.id) and at.query_params["run"] == str(run.id)
    finally:
        api.stop(run.id)
        api.stop(train.id)


def test_what_the_session_chose_wins_over_the_address(workspace_model, tmp_path):
    other = tiny_steel_model(tmp_path)
    at = open_page("data", run=False)
    at.session_state["model"] = other
    at.query_params["model"] = "address-test/model"
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["model"] == other
    assert at.query_params["model"] == str(Path(other).resolve())  # the address follows the session


@pytest.mark.parametrize("address, message", [
    ({"model": "/etc"}, "/etc is outside the configured data roots"),
    ({"format": "neu-seg", "root": "/etc"}, "/etc is outside the configured data roots"),
    ({"format": "no-such-format"}, "?format=no-such-format is not a dataset format"),
    ({"format": "synthetic-tile", "seed": "abc"}, "?seed=abc: 'abc' is not a whole number"),
    ({"format": "synthetic-tile", "model": "no/such/checkpoint"}, "does not exist"),
    ({"format": "synthetic-tile", "options": "{category"}, "not valid JSON"),
])
def test_a_bad_value_in_the_address_is_one_error_and_the_default_workspace(workspace_model, address, message):
    at = refreshed("data", {**address, "run": "12abc"})  # a bad ?run= is the Prune page's to report
    assert len(at.error) == 1, [e.value for e in at.error]
    assert "Reopening the workspace in the address failed" in at.error[0].value and message in at.error[0].value
    assert "model" not in at.session_state and at.session_state["dataset"]["format"] == DEFAULT_FORMAT
    assert "none yet" in sidebar_text(at)
    assert at.query_params["format"] == DEFAULT_FORMAT and "model" not in at.query_params
    at.run()  # the session has its workspace now: the address is not read again
    assert not at.exception and not at.error


def test_an_outside_model_beside_a_job_in_the_address_restores_nothing(workspace_model, monkeypatch):
    """A good job and a bad ?model=: nothing half-restored (the job's model does not slip in)."""
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    run = api.submit("prune", {"checkpoint": workspace_model, "method": "uniform-l1"})
    try:
        at = refreshed("data", {"run": str(run.id), "model": "/etc/passwd"})
        assert len(at.error) == 1 and "outside the configured data roots" in at.error[0].value
        assert "model" not in at.session_state
    finally:
        api.stop(run.id)
