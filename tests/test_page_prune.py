"""The Prune page through AppTest: before a model, launching, following, stopping and reopening
runs, several runs on one frontier."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core.runs import api
from core.runs.worker import execute_job
from page_helpers import claim, figure, open_page, sidebar_text, tiny_steel_model, values

FRONTIER = "Accuracy against cost, one line per run"
ROUNDS = "Validation defect mIoU against MACs, round by round"


def page() -> AppTest:
    return open_page("prune", run=False)


@pytest.fixture()
def tiny_model(tmp_path) -> str:
    # the checkpoint says 20 points; each run measures its own starting point
    return tiny_steel_model(tmp_path, metrics={"defect_miou": 20.0})


@pytest.fixture()
def no_worker(monkeypatch) -> list:
    """No worker process in these tests: the test runs jobs itself. Returns the calls the
    pages made to start one."""
    started = []
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: started.append(True))
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: False)
    return started


def stored_run(checkpoint: str, method: str, mious: list[float], base_miou: float = 50.0,
               state: str = "succeeded", result: dict | None = None, **params) -> int:
    """A prune run as the worker records it (job, run, base measurement, rounds, the loop's
    ``result`` when given), without running it."""
    store = api.open_store()
    job_id = store.create_job("prune", {"checkpoint": checkpoint, "method": method, "tolerance": 5.0, **params})
    claim(job_id)
    run_id = store.upsert_prune_run(job_id, checkpoint, store.job_dir(job_id) / "prune", method, {})
    base_macs = 1e9
    store.update_prune_run(run_id, base={"macs": base_macs, "params": 1e6, "defect_miou": base_miou})
    rounds = [{"round": i + 1, "accepted": True, "macs": int(base_macs * 0.7 ** (i + 1)), "params": 10**6,
               "macs_reduction": 1 - 0.7 ** (i + 1), "params_reduction": 0.0, "defect_miou": m,
               "drop": base_miou - m, "latency_ms": 1.0, "wall_s": 1.0, "checkpoint": checkpoint}
              for i, m in enumerate(mious)]
    store.save_rounds(run_id, rounds)
    if result is not None:
        store.update_prune_run(run_id, result=result)
    if state != "running":
        store.finish_job(job_id, state, result={})
    return job_id


def test_without_a_model_the_page_says_what_to_do():
    at = page()
    at.run()
    assert not at.exception
    assert any("No model yet" in info.value for info in at.info)


def test_a_launched_run_is_drawn_round_by_round(tiny_model, no_worker):
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
    claim(job_id)
    assert execute_job(store, job_id) == "succeeded", store.get_job(job_id).error
    at.run()
    assert not at.exception and not at.error
    chart = figure(at, ROUNDS)
    figure(at, FRONTIER)
    assert chart["data"][0]["text"] == ["r0", "r1"]  # the unpruned model, then round 1
    # the tolerance band hangs under what the run measured for its starting checkpoint,
    # not under the number saved in the checkpoint (20.0)
    base = api.job_details(job_id)["prune_run"]["base"]["defect_miou"]
    band = next(shape for shape in chart["layout"]["shapes"] if shape["type"] == "rect")
    assert band["y1"] == pytest.approx(base) and band["y0"] == pytest.approx(base - 1.0)
    assert base != 20.0
    progress = at.get("progress")[0].proto
    assert progress.value == 100 and "succeeded" in progress.text


def test_a_reopened_tab_finds_the_run_in_the_address(tiny_model):
    job_id = stored_run(tiny_model, "uniform-l1", [48.0, 46.0], base_miou=50.0)
    at = page()
    at.query_params["run"] = str(job_id)  # nothing in the session: a refreshed or reopened tab
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["run"] == job_id
    assert at.session_state["model"] == tiny_model  # the run's starting checkpoint is the model again
    assert f"#{job_id} uniform-l1 (succeeded)" in sidebar_text(at)
    chart = figure(at, ROUNDS)
    assert chart["data"][0]["text"] == ["r0", "r1", "r2"]
    band = next(shape for shape in chart["layout"]["shapes"] if shape["type"] == "rect")
    assert (band["y0"], band["y1"]) == (45.0, 50.0)  # the run's base, its tolerance of 5 points
    assert at.selectbox(key="prune_method").value  # the form is back too


def test_runs_of_several_methods_share_one_frontier_and_any_can_be_opened(tiny_model):
    first = stored_run(tiny_model, "uniform-l1", [49.0, 47.0])
    second = stored_run(tiny_model, "collaborative", [49.5, 48.5, 47.5])
    at = page()
    at.session_state["model"] = tiny_model
    at.run()
    assert not at.exception and not at.error
    lines = {trace["name"]: trace for trace in figure(at, FRONTIER)["data"]}
    assert {f"#{first} uniform-l1", f"#{second} collaborative"} <= set(lines)
    assert list(values(lines[f"#{second} collaborative"]["y"])) == [50.0, 49.5, 48.5, 47.5]  # its start, three rounds
    at.selectbox(key="prune_open").set_value(first)
    at.button(key="prune_open_run").click().run()
    assert not at.exception and not at.error
    assert at.session_state["run"] == first and at.query_params["run"] == str(first)
    assert figure(at, ROUNDS)["data"][0]["text"] == ["r0", "r1", "r2"]


def test_a_run_panel_shows_the_runs_own_settings_and_its_test_result(tiny_model):
    job_id = stored_run(tiny_model, "uniform-l1", [49.0], target_macs=0.6, step=0.4, finetune_epochs=3,
                        distill_weight=0.3, recover_epochs=4, result={"checkpoint": tiny_model, "test": {
                            "defect_miou": 41.26}, "base_val_defect_miou": 50.0, "drop": 1.0})
    plain = stored_run(tiny_model, "collaborative", [49.0], state="running")
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job_id
    at.run()
    assert not at.exception and not at.error
    settings = next(c.value for c in at.caption if c.value.startswith("Settings:"))
    for words in ("method uniform-l1", "target 60% fewer MACs", "tolerance 5 points", "step 40%",
                  "3 fine-tune epoch(s) per round", "at most 10 rounds", "distillation 0.3 (T 2)",
                  "recovery 4 epoch(s) (the fine-tune rate)"):
        assert words in settings, settings
    assert next(m.value for m in at.metric if m.label == "Test defect mIoU of the result") == "41.3"
    at.session_state["run"] = plain  # running: no test result yet, and no distillation or recovery said
    at.run()
    assert not at.exception and not at.error
    settings = next(c.value for c in at.caption if c.value.startswith("Settings:"))
    assert "method collaborative" in settings and "distillation" not in settings and "recovery" not in settings
    assert not [m for m in at.metric if m.label == "Test defect mIoU of the result"]


def test_stop_asks_the_store_and_a_run_without_a_worker_gets_one(tiny_model, no_worker):
    job_id = stored_run(tiny_model, "uniform-l1", [49.0], state="running")
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job_id
    at.run()
    assert not at.exception and not at.error
    assert no_worker  # running, and no worker alive (a restarted server): one is started
    at.button(key=f"stop_{job_id}").click().run()
    assert not at.exception and not at.error
    assert api.get_job(job_id).stop_requested
    assert any("Stop requested" in c.value for c in at.caption)
    assert not [b for b in at.button if b.key == f"stop_{job_id}"]
    api.open_store().finish_job(job_id, "stopped")
    at.run()
    assert not at.exception and not at.error
    assert [b for b in at.button if b.key == f"resume_{job_id}"]


def test_a_store_read_that_fails_inside_the_progress_fragment_is_an_error_box(tiny_model, monkeypatch):
    job_id = stored_run(tiny_model, "uniform-l1", [49.0])

    def unreadable(*_args, **_kwargs):
        raise OSError("disk I/O error")

    monkeypatch.setattr(api, "prune_run", unreadable)  # what the page reads a run with
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job_id
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(e.startswith(f"Following run {job_id} failed unexpectedly (OSError: disk I/O error)") for e in errors)


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
    claim(job.id)
    assert execute_job(store, job.id) == "failed"
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job.id
    at.run()
    assert not at.exception
    assert at.error and "The run failed" in at.error[0].value and "vanished" in at.error[0].value
    assert [b for b in at.button if b.key == f"resume_{job.id}"]
    assert at.session_state["run"] == job.id and at.session_state["model"] == tiny_model
