"""The Prune form's budget: fewer MACs (the request's default), fewer parameters, a latency
reduction or a target latency in ms, each submitted as the request's own exclusive target and
cost model, with the latency table's engine and threads for a latency budget."""

from __future__ import annotations

import pytest

from core.runs import api
from page_helpers import open_page, tiny_steel_model


@pytest.fixture()
def tiny_model(tmp_path) -> str:
    return tiny_steel_model(tmp_path)


@pytest.fixture(autouse=True)
def no_worker(monkeypatch) -> None:
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: False)


def form(model: str, budget: str | None = None):
    at = open_page("prune", run=False)
    at.session_state["model"] = model
    at.run()
    assert not at.exception and not at.error
    if budget is not None:
        at.radio(key="prune_budget").set_value(budget).run()
        assert not at.exception and not at.error
    return at


def launch(at):
    at.button[0].click().run()  # the form's submit button
    assert not at.exception
    return at


def settings_caption(at) -> str:
    return next(c.value for c in at.caption if c.value.startswith("Settings:"))


def test_the_default_budget_is_the_requests_80_percent_fewer_macs_with_no_latency_settings(tiny_model):
    at = form(tiny_model)
    assert at.radio(key="prune_budget").value == "macs"
    assert at.slider(key="prune_target").value == 0.8
    assert at.slider(key="prune_target").label == "Target: fewer MACs"
    assert at.slider(key="prune_step").label == "Step: share of the remaining MACs cut per round"
    keys = {w.key for w in at.radio} | {w.key for w in at.number_input}
    assert "prune_latency_engine" not in keys and "prune_latency_threads" not in keys
    assert not any("latency table" in c.value for c in at.caption)
    launch(at)
    assert not at.error
    params = api.get_job(at.session_state["run"]).params
    assert params["target_macs"] == 0.8 and params["cost"] == "macs"
    assert "target_latency" not in params and "target_params" not in params
    assert "target 80% fewer MACs" in settings_caption(at)


def test_a_latency_reduction_budget_submits_cost_latency_with_the_engine_and_threads(tiny_model):
    at = form(tiny_model, "latency")
    assert at.slider(key="prune_target").label == "Target: lower latency"
    captions = [c.value for c in at.caption if "latency table" in c.value]
    assert len(captions) == 1 and "seconds to a minute" in captions[0] and "reuse" in captions[0]
    engine = at.radio(key="prune_latency_engine")
    assert engine.value == "torch" and list(engine.options) == ["PyTorch", "ONNX Runtime"]
    at.slider(key="prune_target").set_value(0.5)
    engine.set_value("onnxruntime")
    at.number_input(key="prune_latency_threads").set_value(2)
    launch(at)
    assert not at.error, [e.value for e in at.error]
    params = api.get_job(at.session_state["run"]).params
    assert params["cost"] == "latency" and params["target_macs"] == 0.5
    assert params["latency_engine"] == "onnxruntime" and params["latency_threads"] == 2
    assert "target_latency" not in params
    assert "target 50% lower latency" in settings_caption(at)
    assert at.slider(key="prune_step").label == "Step: share of the remaining predicted latency cut per round"


def test_a_target_latency_in_ms_sets_target_latency_alone(tiny_model):
    at = form(tiny_model, "latency_ms")
    at.number_input(key="prune_target_latency").set_value(5.0)
    launch(at)
    assert not at.error, [e.value for e in at.error]
    params = api.get_job(at.session_state["run"]).params
    assert params["target_latency"] == 5.0 and params["cost"] == "latency"
    assert params["latency_engine"] == "torch" and params["latency_threads"] == 1
    assert "target_macs" not in params and "target_params" not in params
    assert "target latency 5 ms" in settings_caption(at)


def test_a_parameter_budget_sets_target_params(tiny_model):
    at = form(tiny_model, "params")
    assert at.slider(key="prune_target").label == "Target: fewer parameters"
    at.slider(key="prune_target").set_value(0.6)
    launch(at)
    assert not at.error, [e.value for e in at.error]
    params = api.get_job(at.session_state["run"]).params
    assert params["target_params"] == 0.6 and params["cost"] == "macs" and "target_macs" not in params


@pytest.mark.parametrize("value, says", [(0.0, "--target-latency: 0.0 must be a positive number"),
                                         (-3.0, "--target-latency: -3.0 must be a positive number"),
                                         (None, "type the target latency in ms")])
def test_an_impossible_target_latency_is_one_error_box_and_no_job(tiny_model, value, says):
    at = form(tiny_model, "latency_ms")
    at.number_input(key="prune_target_latency").set_value(value)
    before = len(api.list_jobs(kind="prune", limit=None))
    launch(at)
    assert len(at.error) == 1 and says in at.error[0].value, [e.value for e in at.error]
    assert at.error[0].value.startswith("Launching the run failed")
    assert len(api.list_jobs(kind="prune", limit=None)) == before
