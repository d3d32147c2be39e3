"""The Prune page through AppTest: before a model, launching, following, stopping and reopening
runs, several runs on one frontier."""

from __future__ import annotations

import functools

import pytest
import streamlit.testing.v1.local_script_runner as local_script_runner
from streamlit.runtime.scriptrunner import RerunData
from streamlit.testing.v1 import AppTest

from core.runs import api
from core.runs.worker import execute_job
from page_helpers import chart_titles, claim, figure, open_page, sidebar_text, tiny_steel_model, values

FRONTIER = "Accuracy against cost, one line per run"
LATENCY_FRONTIER = "Accuracy against latency, one line per run"
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
               state: str = "succeeded", result: dict | None = None, accepted: list[bool] | None = None,
               checkpoints: list[str] | None = None, latency: list[float | None] | None = None, **params) -> int:
    """A prune run as the worker records it (job, run, base measurement, rounds, the loop's
    ``result`` when given), without running it. Rounds are kept unless ``accepted`` says
    otherwise; each round's checkpoint is ``checkpoints[i]`` (else the starting one) and its
    latency ``latency[i]`` ms (else 10 x 0.7^round)."""
    store = api.open_store()
    job_id = store.create_job("prune", {"checkpoint": checkpoint, "method": method, "tolerance": 5.0, **params})
    claim(job_id)
    run_id = store.upsert_prune_run(job_id, checkpoint, store.job_dir(job_id) / "prune", method, {})
    base_macs = 1e9
    store.update_prune_run(run_id, base={"macs": base_macs, "params": 1e6, "defect_miou": base_miou})
    store.save_rounds(run_id, [stored_round(i + 1, m, base_miou, checkpoint if checkpoints is None else checkpoints[i],
                                            True if accepted is None else accepted[i],
                                            10 * 0.7 ** (i + 1) if latency is None else latency[i])
                               for i, m in enumerate(mious)])
    if result is not None:
        store.update_prune_run(run_id, result=result)
    if state != "running":
        store.finish_job(job_id, state, result={})
    return job_id


def stored_round(index: int, miou: float, base_miou: float, checkpoint: str, accepted: bool = True,
                 latency_ms: float | None = 1.0, base_macs: float = 1e9) -> dict:
    return {"round": index, "accepted": accepted, "macs": int(base_macs * 0.7 ** index), "params": 10**6,
            "macs_reduction": 1 - 0.7 ** index, "params_reduction": 0.0, "defect_miou": miou,
            "drop": base_miou - miou, "latency_ms": latency_ms, "wall_s": 1.0, "checkpoint": checkpoint}


def add_round(job_id: int, record: dict) -> None:
    """A round the worker finished while the page was open."""
    store = api.open_store()
    store.save_rounds(store.get_prune_run(job_id)["id"], [record])


class Screen:
    """What the browser shows across reruns. AppTest reruns the whole script; the page's timed
    refresh reruns only its polling fragments (``st.fragment(run_every=...)``), and the browser
    keeps every element drawn outside them as the last full run left it. ``refresh()`` reruns
    those fragments alone and shows the last full run's elements overlaid with theirs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch = monkeypatch
        self.full: list = []  # the messages of the last full run
        self.timed: list[str] = []  # the fragments that asked for timed reruns in it
        self.fragment_run = False
        parse = local_script_runner.parse_tree_from_messages

        def screen(messages):
            messages = list(messages)
            if self.fragment_run:  # what the rerun fragments drew before goes; the rest stays
                kept = [m for m in self.full if not (m.HasField("delta") and m.delta.fragment_id in self.timed)]
                return parse(kept + messages)
            self.full = messages
            self.timed = list(dict.fromkeys(m.auto_rerun.fragment_id for m in messages if m.HasField("auto_rerun")))
            return parse(messages)

        monkeypatch.setattr(local_script_runner, "parse_tree_from_messages", screen)

    def refresh(self, at: AppTest) -> AppTest:
        """The timed rerun of every polling fragment, as the browser asks for it every 2 s."""
        assert self.timed, "nothing on the page refreshes by itself"
        self.fragment_run = True
        with self.monkeypatch.context() as patch:
            patch.setattr(local_script_runner, "RerunData",
                          functools.partial(RerunData, fragment_id_queue=self.timed, is_auto_rerun=True))
            try:
                at.run()
            finally:
                self.fragment_run = False
        return at


def frontier_messages(at: AppTest) -> list[str]:
    """What the frontier section says instead of (or under) its charts."""
    return [i.value for i in at.info if i.value.startswith(("No kept round", "No round", "No run"))]


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


def test_a_run_panel_names_a_latency_or_parameter_target_in_its_own_words(tiny_model):
    """The settings line names the target the run was launched with; only a run left at the
    request's default shows the default MACs target."""
    shown = {}
    for name, params in {"latency": {"target_latency": 5.0}, "params": {"target_params": 0.5},
                         "latency reduction": {"target_macs": 0.4, "cost": "latency"}, "default": {}}.items():
        job_id = stored_run(tiny_model, "uniform-l1", [49.0], **params)
        at = page()
        at.session_state["model"] = tiny_model
        at.session_state["run"] = job_id
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        shown[name] = next(c.value for c in at.caption if c.value.startswith("Settings:"))
    assert "target latency 5 ms" in shown["latency"] and "MACs" not in shown["latency"].split(",")[1]
    assert "target 50% fewer parameters" in shown["params"]
    assert "target 40% lower latency" in shown["latency reduction"]
    assert "target 80% fewer MACs" in shown["default"]


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
    # the round table reads as people read: plain names, percentages, one decimal, MACs in M
    [table] = [t.value for t in at.dataframe if "fewer MACs" in t.value.columns]
    row = table.iloc[0].to_dict()
    assert row["round"] == 1 and row["kept"] == "yes" and row["fewer MACs"] == "30.0%"
    assert row["MACs"] == "700.00 M" and row["val defect mIoU"] == "49.0" and row["drop (points)"] == "+1.0"
    assert "macs_reduction" not in table.columns
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


# ---------------------------------------------------------------- the frontier while runs go on
@pytest.fixture()
def own_workspace(tmp_path, monkeypatch):
    """A run store of its own: the frontier draws every run in the store, and the session's
    store has the other tests' runs."""
    monkeypatch.setenv("DEFECTPRUNE_WORKSPACE", str(tmp_path / "workspace"))


def test_a_round_kept_while_the_run_goes_on_reaches_the_frontier_on_the_timed_refresh(tiny_model, no_worker,
                                                                                      own_workspace, monkeypatch):
    screen = Screen(monkeypatch)
    job_id = stored_run(tiny_model, "uniform-l1", [], state="running")
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job_id
    at.run()
    assert not at.exception and not at.error
    assert not [t for t in chart_titles(at) if t.startswith(FRONTIER)]
    assert frontier_messages(at)  # nothing on the frontier yet, and the page says so
    add_round(job_id, stored_round(1, 49.0, 50.0, tiny_model))  # round 1 kept; the run goes on
    screen.refresh(at)  # what the browser shows 2 s later, without a full rerun
    assert not at.exception and not at.error
    assert not frontier_messages(at), frontier_messages(at)  # no "No kept round yet" beside a kept round 1
    lines = {trace["name"]: trace for trace in figure(at, FRONTIER)["data"]}
    assert list(values(lines[f"#{job_id} uniform-l1"]["y"])) == [50.0, 49.0]  # its start, then round 1
    assert figure(at, ROUNDS)["data"][0]["text"] == ["r0", "r1"]  # the panel and the frontier agree
    add_round(job_id, stored_round(2, 48.0, 50.0, tiny_model))
    screen.refresh(at)
    lines = {trace["name"]: trace for trace in figure(at, FRONTIER)["data"]}
    assert list(values(lines[f"#{job_id} uniform-l1"]["y"])) == [50.0, 49.0, 48.0]


def test_a_run_followed_elsewhere_also_refreshes_the_frontier(tiny_model, no_worker, own_workspace, monkeypatch):
    """Not only the run the page follows: any unfinished run's kept rounds come in."""
    screen = Screen(monkeypatch)
    job_id = stored_run(tiny_model, "collaborative", [], state="running")
    at = page()
    at.session_state["model"] = tiny_model  # no run opened on the page
    at.run()
    assert not at.exception and not at.error
    add_round(job_id, stored_round(1, 49.5, 50.0, tiny_model))
    screen.refresh(at)
    assert not at.exception and not at.error
    assert f"#{job_id} collaborative" in {trace["name"] for trace in figure(at, FRONTIER)["data"]}
    assert not frontier_messages(at)


def test_rounds_none_of_them_kept_are_said_as_such_not_drawn_as_a_lone_start(tiny_model, own_workspace):
    at = page()
    at.session_state["model"] = tiny_model
    at.run()
    assert frontier_messages(at) == ["No run yet: launch one above; each run's kept rounds appear here as they "
                                     "finish."]
    going = stored_run(tiny_model, "uniform-l1", [], state="running")
    at.run()
    assert frontier_messages(at) == ["No round finished yet: each run's kept rounds appear here as they finish "
                                     "(this refreshes every 2 s while a run is going)."]
    api.open_store().finish_job(going, "stopped")
    job_id = stored_run(tiny_model, "uniform-l1", [40.0], accepted=[False])  # round 1 broke the tolerance
    at.run()
    assert not at.exception and not at.error
    assert not [t for t in chart_titles(at) if t.startswith(FRONTIER)]  # no line of one starting point
    message = " ".join(frontier_messages(at))
    assert message.startswith("No kept round yet"), frontier_messages(at)
    assert f"#{job_id}" in message and "1 round" in message and "tolerance" in message
    kept = stored_run(tiny_model, "collaborative", [49.0])
    at.run()
    assert not frontier_messages(at)  # a kept round: the chart, and the other run named under it
    assert {trace["name"] for trace in figure(at, FRONTIER)["data"]} == {f"#{kept} collaborative"}
    assert any(f"#{job_id}" in c.value and "tolerance" in c.value for c in at.caption)


def test_a_latency_frontier_beside_the_macs_one_in_the_same_colours(tiny_model, own_workspace):
    first = stored_run(tiny_model, "uniform-l1", [49.0, 47.0, 40.0], accepted=[True, True, False],
                       latency=[8.0, 6.5, 5.0])
    second = stored_run(tiny_model, "collaborative", [49.5, 48.0], latency=[7.5, 6.0], base_miou=51.0)
    at = page()
    at.session_state["model"] = tiny_model
    at.run()
    assert not at.exception and not at.error
    macs = {trace["name"]: trace for trace in figure(at, FRONTIER)["data"]}
    latency = {trace["name"]: trace for trace in figure(at, LATENCY_FRONTIER)["data"]}
    names = {f"#{first} uniform-l1", f"#{second} collaborative"}
    assert set(macs) == set(latency) == names
    # the kept rounds only (round 3 broke the tolerance), at the latency each one measured
    assert list(values(latency[f"#{first} uniform-l1"]["x"])) == [8.0, 6.5]
    assert list(values(latency[f"#{first} uniform-l1"]["y"])) == [49.0, 47.0]
    assert list(values(latency[f"#{second} collaborative"]["x"])) == [7.5, 6.0]
    colours = {name: trace["line"]["color"] for name, trace in macs.items()}
    assert {name: trace["line"]["color"] for name, trace in latency.items()} == colours
    assert len(set(colours.values())) == 2
    # the runs record no latency for their start: each start is a reference line at its val defect mIoU
    layout = figure(at, LATENCY_FRONTIER)["layout"]
    starts = sorted(shape["y0"] for shape in layout["shapes"])
    assert starts == [50.0, 51.0]
    assert all("latency not recorded" in note["text"] for note in layout["annotations"])
    assert layout["xaxis"]["title"]["text"].startswith("torch latency (ms")
    columns = at.main.columns  # the two charts side by side
    assert any(len(c.get("plotly_chart")) == 1 for c in columns)


def test_rounds_that_recorded_no_latency_are_said_to_have_none(tiny_model, own_workspace):
    stored_run(tiny_model, "uniform-l1", [49.0, 47.0], latency=[None, None])
    at = page()
    at.session_state["model"] = tiny_model
    at.run()
    assert not at.exception and not at.error
    figure(at, FRONTIER)  # the MACs frontier still
    assert not [t for t in chart_titles(at) if t.startswith(LATENCY_FRONTIER)]  # no latency invented
    assert any(i.value.startswith("No latency recorded") for i in at.info)


# ---------------------------------------------------------------- to Compare
@pytest.fixture()
def no_comparison(monkeypatch):
    """Compare stops at its comparison (these tests are about which models it compares)."""
    import core.services.compare as service

    def refused(request, *_args, **_kwargs):
        raise service.CompareRequestError(f"not compared in this test ({request.before} -> {request.after})")

    monkeypatch.setattr(service, "checked_specs", refused)  # the page's first check, before any work


def test_compare_this_run_opens_compare_on_its_start_and_its_best_kept_round(tiny_model, tmp_path, no_worker,
                                                                             own_workspace, no_comparison):
    rounds = [tiny_steel_model(tmp_path / f"round_{i}") for i in (1, 2, 3)]
    other = tiny_steel_model(tmp_path / "other")
    job_id = stored_run(tiny_model, "uniform-l1", [49.0, 47.0, 40.0], accepted=[True, True, False],
                        checkpoints=rounds, state="running")  # round 3 broke the tolerance; the run goes on
    for path in rounds:  # as the runner registers each round's checkpoint
        api.open_store().register_model(path, job_id=job_id, arch="unet", encoder="resnet18", pruned=True)
    at = page()
    at.session_state["model"] = other  # the workspace is elsewhere
    at.session_state["run"] = job_id
    at.run()
    assert not at.exception and not at.error
    at.button(key=f"compare_run_{job_id}").click().run()
    assert not at.exception
    assert at.title[0].value == "Compare"
    assert at.session_state["run"] == job_id and at.session_state["model"] == tiny_model  # the run's workspace
    assert at.selectbox(key="compare_before").value == tiny_model  # its start
    assert at.selectbox(key="compare_after").value == rounds[1]  # its last kept round, not the rejected one
    assert any(f"Run #{job_id}: before is its starting model, after is its last kept round so far (round 2)"
               in c.value for c in at.caption)
    assert [e.value for e in at.error] == [f"Comparing failed: not compared in this test ({tiny_model} -> "
                                           f"{rounds[1]})"]
    # the user's own choice then wins in this session, also after another page ...
    at.selectbox(key="compare_after").set_value(rounds[0]).run()
    at.switch_page("pages/views/prune.py").run()
    at.switch_page("pages/views/compare.py").run()
    assert at.selectbox(key="compare_after").value == rounds[0]
    assert not any(c.value.startswith(f"Run #{job_id}:") for c in at.caption)
    # ... until the run is asked for again
    at.switch_page("pages/views/prune.py").run()
    at.button(key=f"compare_run_{job_id}").click().run()
    assert at.title[0].value == "Compare"
    assert at.selectbox(key="compare_after").value == rounds[1]


def test_a_run_without_a_kept_round_offers_nothing_to_compare(tiny_model, no_worker, own_workspace):
    job_id = stored_run(tiny_model, "uniform-l1", [40.0], accepted=[False], state="running")
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job_id
    at.run()
    assert not at.exception and not at.error
    assert at.button(key=f"compare_run_{job_id}").disabled


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
