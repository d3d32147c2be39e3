"""The Layer importance page through AppTest: live tuning answers, scoring-network charts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.runs import api
from core.runs.store import RUNNING, STOPPED
from core.runs.worker import execute_job
from page_helpers import chart_titles, claim, figure, open_page, run_inline, tiny_steel_model, values


def page(model: str | None = None) -> AppTest:
    return open_page("importance", model)


def macs_metric(at: AppTest) -> str:
    return next(m.value for m in at.metric if m.label == "MACs")


@pytest.fixture()
def tiny_model(tmp_path) -> str:
    return tiny_steel_model(tmp_path)


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> tuple[str, object, object]:
    """A tiny model with its pruning graph and cost model, as the page builds them."""
    from core.allocation.cost import CostModel
    from core.models.checkpoint import load_checkpoint
    from core.models.graph import PruningGraph

    path = tiny_steel_model(tmp_path_factory.mktemp("network"))
    loaded = load_checkpoint(path)
    graph = PruningGraph.traced(loaded.model, loaded.spec.input_size, loaded.spec.in_channels)
    return path, graph, CostModel(graph)


def bar_heights(spec: dict) -> dict[str, float]:
    """Layer -> bar height over every trace of a per-layer bar chart."""
    return {x: float(y) for trace in spec["data"] for x, y in zip(trace["x"], values(trace["y"]))}


def assert_network_order(spec: dict, graph) -> None:
    order = [g.name for g in graph.groups]
    assert spec["layout"]["xaxis"]["categoryorder"] == "array"
    assert spec["layout"]["xaxis"]["categoryarray"] == order
    # the order matters here: this network's scales go down and up again, so the bars
    # grouped by scale (plotly's order without one) would not be in network order
    scales = [g.scale for g in graph.groups]
    assert scales != sorted(scales) and scales != sorted(scales, reverse=True)


def test_without_a_model_the_page_says_what_to_do():
    at = page()
    assert any("No model yet" in info.value for info in at.info)


def test_live_tuning_answers_the_slider_and_the_allocator(tiny_model):
    at = page(tiny_model)
    assert not at.error
    at.slider(key="importance_target").set_value(50).run()
    half = macs_metric(at)
    at.slider(key="importance_target").set_value(90).run()
    assert macs_metric(at) != half
    uniform = figure(at, "Share of channels kept per layer (uniform)")
    at.radio(key="importance_allocator").set_value("global (L1)").run()
    assert not at.exception and not at.error
    global_ = figure(at, "Share of channels kept per layer (global (L1))")
    assert uniform["data"] != global_["data"]


def test_scoring_network_results_are_drawn_in_network_order_in_a_reopened_tab(network):
    tiny_model, graph, _cost = network
    job = api.submit("score", {"checkpoint": tiny_model, "method": "collaborative", "target": 0.8,
                               "scoring_steps": 3, "calibration_images": 8})
    run_inline(job.id)
    # a reopened tab: nothing in the session, only the job in the address
    at = open_page("importance", run=False)
    at.query_params["score"] = str(job.id)
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["model"] == str(Path(tiny_model).resolve())  # the job's model is back
    bars = figure(at, "Importance per layer")
    assert {trace["name"].split(",")[0] for trace in bars["data"]} >= {"stride 2", "stride 32"}
    assert {trace["name"].split(", ")[1] for trace in bars["data"]} == {"encoder", "decoder"}
    assert_network_order(bars, graph)
    assert_network_order(figure(at, "Share of channels kept per layer"), graph)
    figure(at, "Importance per scale")
    heatmap = figure(at, "Layer x defect-class importance")
    assert heatmap["data"][0]["type"] == "heatmap"
    # every layer is named on its axis, in network order
    assert heatmap["layout"]["xaxis"]["ticktext"] == [g.name for g in graph.groups]
    at.radio(key="importance_allocator").set_value("scoring network").run()
    assert not at.exception and not at.error
    figure(at, "Share of channels kept per layer (scoring network)")
    # the importance follows the slider's target (the job scored at 80%; its logits answer any)
    at80 = bar_heights(figure(at, "Importance per layer (keep ratio at 80% fewer MACs)"))
    at.slider(key="importance_target").set_value(40).run()
    assert not at.exception and not at.error
    at40 = bar_heights(figure(at, "Importance per layer (keep ratio at 40% fewer MACs)"))
    assert at40 != at80 and sum(at40.values()) > sum(at80.values())  # less cut: more kept
    figure(at, "Importance per scale (MACs-weighted, at 40% fewer MACs)")


def test_a_per_layer_override_changes_the_allocation_chart_and_the_predicted_macs(network):
    tiny_model, graph, _cost = network
    at = page(tiny_model)
    at.slider(key="importance_target").set_value(50).run()
    title = "Share of channels kept per layer (uniform)"
    before, macs_before = bar_heights(figure(at, title)), macs_metric(at)
    first = graph.groups[0]
    assert before[first.name] > 1 / first.channels  # the allocator keeps more than one channel of it
    # what the data editor sends when the user types 1 into the first layer's "kept" cell
    at.session_state["importance_overrides"] = {"edited_rows": {0: {"kept": 1}}, "added_rows": [],
                                                "deleted_rows": []}
    at.run()
    assert not at.exception and not at.error
    after = bar_heights(figure(at, title))
    assert after[first.name] == pytest.approx(1 / first.channels)
    assert {k: v for k, v in after.items() if k != first.name} == {k: v for k, v in before.items() if k != first.name}
    assert macs_metric(at) != macs_before


def test_the_preview_shows_masks_without_changing_the_totals(tiny_model):
    at = page(tiny_model)
    at.slider(key="importance_target").set_value(50).run()
    before = macs_metric(at)
    at.button(key="importance_preview").click().run()
    assert not at.exception and not at.error
    assert len(at.get("image")) == 9  # 3 images x (ground truth, unpruned, pruned copy)
    captions = [image.proto.imgs[0].caption for image in at.get("image")]
    assert captions[0] == "image 1: ground truth" and captions[1].startswith("unpruned: defect mIoU ")
    assert captions[2].startswith("pruned copy: defect mIoU ")
    assert macs_metric(at) == before
    [macs] = [m for m in at.metric if m.label == "MACs"]
    assert macs.value.endswith((" M", " G")) and macs.proto.delta.startswith("-")
    from streamlit.proto.Metric_pb2 import Metric

    # a reduction is drawn as a gain: down and green, not a red loss
    assert macs.proto.direction == Metric.DOWN and macs.proto.color == Metric.GREEN


def test_sensitivity_without_curves_says_what_to_do_then_answers_live(tiny_model, monkeypatch):
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    at = page(tiny_model)
    at.radio(key="importance_allocator").set_value("sensitivity").run()
    assert not at.exception and not at.error
    assert any("No sensitivity curves for this model yet" in info.value for info in at.info)
    assert not any(t.startswith("Share of channels kept") for t in chart_titles(at))
    at.button(key="importance_sensitivity_run").click().run()
    assert not at.exception and not at.error
    job_id = at.session_state["sensitivity_job"]
    job = api.get_job(job_id)
    assert job.kind == "score" and job.params["allocator"] == "sensitivity"
    assert at.query_params["sensitivity"] == str(job_id)  # a refreshed tab finds it again
    # while it waits: progress, no button, no chart
    assert any(f"job {job_id}" in p.proto.text for p in at.get("progress"))
    assert not [b for b in at.button if b.key == "importance_sensitivity_run"]
    assert any("waiting for the worker" in p.proto.text for p in at.get("progress"))
    # its panel stops it (a queued job at once); the test measures with fewer images below
    at.button(key=f"stop_{job_id}").click().run()
    assert not at.exception and not at.error
    assert api.get_job(job_id).state == "stopped"
    assert any(f"was stopped (job {job_id}); start it again" in w.value for w in at.warning)
    assert [b for b in at.button if b.key == "importance_sensitivity_run"]
    measured = api.submit("score", {"checkpoint": tiny_model, "method": "uniform-l1", "allocator": "sensitivity",
                                    "calibration_images": 8})
    run_inline(measured.id)
    at.run()
    assert not at.exception and not at.error
    assert not any("No sensitivity curves" in info.value for info in at.info)
    at.slider(key="importance_target").set_value(50).run()
    half = figure(at, "Share of channels kept per layer (sensitivity)")
    half_macs = macs_metric(at)
    at.slider(key="importance_target").set_value(80).run()
    assert not at.exception and not at.error
    tight = figure(at, "Share of channels kept per layer (sensitivity)")
    assert macs_metric(at) != half_macs
    assert [trace["y"] for trace in half["data"]] != [trace["y"] for trace in tight["data"]]


def test_an_allocator_registered_in_one_line_is_a_choice_the_page_allocates_with(tiny_model, monkeypatch):
    """No page change: the registry line and the allocator's `needs` are all the page reads."""
    from core.allocation.baselines import allocate_uniform
    from core.allocation.context import Allocator
    from core.allocation.registry import ALLOCATORS

    asked: list[tuple[float, bool]] = []

    class HalfTarget(Allocator):  # cuts half of what is asked, from the L1 scores it needs
        label = "half target"
        needs = ("l1_scores",)

        def allocate(self, context, analysis, target_reduction, progress=None):
            raise NotImplementedError

        def recreate(self, graph, cost, target_reduction, stored, limits=None):
            asked.append((target_reduction, stored.l1_scores is not None))
            return allocate_uniform(graph, cost, target_reduction / 2, limits)

    class Measured(Allocator):  # needs both job results: neither is there for a new model
        label = "measured"
        needs = ("logits", "drops")

        def allocate(self, context, analysis, target_reduction, progress=None):
            raise NotImplementedError

    monkeypatch.setitem(ALLOCATORS, "half-target", HalfTarget())
    monkeypatch.setitem(ALLOCATORS, "measured", Measured())
    at = page(tiny_model)
    assert "half target" in at.radio(key="importance_allocator").options
    at.slider(key="importance_target").set_value(80).run()
    at.radio(key="importance_allocator").set_value("half target").run()
    assert not at.exception and not at.error
    halved = bar_heights(figure(at, "Share of channels kept per layer (half target)"))
    assert asked and asked[-1] == (0.8, True)
    at.radio(key="importance_allocator").set_value("uniform").run()
    at.slider(key="importance_target").set_value(40).run()
    assert bar_heights(figure(at, "Share of channels kept per layer (uniform)")) == pytest.approx(halved)
    # one message per missing need, and no allocation until all are there
    at.radio(key="importance_allocator").set_value("measured").run()
    assert not at.exception and not at.error
    infos = [info.value for info in at.info]
    assert any("The measured allocation answers from a scoring job's results" in i for i in infos)
    assert any("No sensitivity curves for this model yet" in i for i in infos)
    assert not any(t.startswith("Share of channels kept") for t in chart_titles(at))


# ---------------------------------------------------------------- bad input
def test_a_corrupt_checkpoint_shows_an_error_and_keeps_the_model_chosen(tiny_model):
    at = page(tiny_model)
    weights = Path(tiny_model, "weights.safetensors")
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])  # a copy cut short
    at.run()
    assert not at.exception
    assert at.error and "not a readable safetensors file" in at.error[0].value, [e.value for e in at.error]
    assert any("Repair or replace that checkpoint" in info.value for info in at.info)
    assert at.session_state["model"] == tiny_model
    weights.write_bytes(good)  # repaired: the page comes back without choosing the model again
    at.run()
    assert not at.exception and not at.error
    figure(at, "Share of channels kept per layer (uniform)")


def test_a_missing_job_in_the_address_is_an_error_and_live_tuning_still_answers(tiny_model):
    at = open_page("importance", tiny_model, run=False)
    at.query_params["score"] = "98765"
    at.run()
    assert not at.exception
    assert at.error and "there is no job 98765" in at.error[0].value
    figure(at, "Share of channels kept per layer (uniform)")
    at.query_params["score"] = "latest"
    at.run()
    assert not at.exception
    assert at.error and "?score=latest in the address is not a job id" in at.error[0].value
    assert at.session_state["model"] == tiny_model


def test_a_failed_sensitivity_job_says_why_and_offers_to_run_it_again(tiny_model, tmp_path):
    # the model's dataset folder vanished before the worker read it
    job = api.submit("score", {"checkpoint": tiny_model, "method": "uniform-l1", "allocator": "sensitivity",
                               "format": "neu-seg", "root": str(tmp_path / "vanished")})
    store = api.open_store()
    claim(job.id)
    assert execute_job(store, job.id) == "failed"
    at = page(tiny_model)
    at.slider(key="importance_target").set_value(60).run()
    at.radio(key="importance_allocator").set_value("sensitivity").run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(f"Measuring the sensitivity curves failed (job {job.id})" in e and "vanished" in e for e in errors)
    assert [b for b in at.button if b.key == "importance_sensitivity_run"]  # run it again from here
    assert at.slider(key="importance_target").value == 60  # what the user set is kept


def test_a_score_job_whose_results_were_deleted_says_so(tiny_model):
    job = api.submit("score", {"checkpoint": tiny_model, "method": "collaborative", "target": 0.8})
    store = api.open_store()
    claim(job.id)
    gone = store.job_dir(job.id) / "scores.json"
    store.finish_job(job.id, "succeeded", result={"scores": str(gone)})  # then the workspace was cleaned
    at = page(tiny_model)
    assert not at.exception
    assert at.error and "is gone (was the workspace cleaned?)" in at.error[0].value
    assert any("Run the scoring network" in info.value for info in at.info)
    assert [b for b in at.button if b.key == "importance_run"]


def test_prune_with_this_allocation_launches_a_run_holding_it_and_opens_it_on_the_prune_page(network, monkeypatch):
    from core.pruning.step import FixedAllocation

    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)
    tiny_model, graph, _cost = network
    at = page(tiny_model)
    at.slider(key="importance_target").set_value(50).run()
    at.session_state["importance_overrides"] = {"edited_rows": {0: {"kept": 3}}, "added_rows": [],
                                                "deleted_rows": []}
    at.run()
    shown = bar_heights(figure(at, "Share of channels kept per layer (uniform)"))
    earlier = {j.id for j in api.list_jobs(kind="prune")}  # other tests' runs in this worker's store
    at.button(key="importance_prune").click().run()
    assert not at.exception and not at.error
    [job] = [j for j in api.list_jobs(kind="prune") if j.id not in earlier]
    assert job.state == "queued" and job.params["target_macs"] == 0.5 and job.params["method"] == "collaborative"
    assert job.params["no_tolerance_stop"] is True  # the chosen cut is kept whatever its drop
    allocation = FixedAllocation.read(job.params["allocation"])
    first = graph.groups[0]
    assert allocation.allocator == "uniform" and allocation.target == 0.5 and allocation.overrides == {first.name: 3}
    assert {g.name: allocation.kept[g.name] / g.channels for g in graph.groups} == pytest.approx(shown)
    allocation.check(graph, "the page's file")  # made for this model
    # on the Prune page, following that run, which the address names
    assert at.session_state["run"] == job.id and at.query_params["run"] == str(job.id)
    assert any(f"job {job.id}" in p.proto.text for p in at.get("progress"))
    assert at.title[0].value == "Prune"
    api.stop(job.id)  # a queued job stops at once: later tests in this workspace claim their own jobs


# ---------------------------------------------------------------- progress and stop
def bar_of(at: AppTest, job_id: int) -> str:
    [text] = [p.proto.text for p in at.get("progress") if f"job {job_id}" in p.proto.text]
    return text


def test_a_running_score_job_shows_its_time_left_and_a_stop_button(tiny_model, monkeypatch):
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)  # the test is the job's worker
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    job = api.submit("score", {"checkpoint": tiny_model, "method": "collaborative", "target": 0.8})
    store = api.open_store()
    claim(job.id)
    try:
        store.heartbeat(job.id, 0.4, "scoring network step 40/100", eta_seconds=170)
        at = page(tiny_model)
        assert not at.exception and not at.error
        text = bar_of(at, job.id)
        assert "The scoring network" in text and "(running): scoring network step 40/100" in text
        assert "elapsed, about 3 min left" in text
        assert not [b for b in at.button if b.key == "importance_run"]  # one at a time
        at.button(key=f"stop_{job.id}").click().run()
        assert not at.exception and not at.error
        assert api.get_job(job.id).stop_requested
        assert any("Stop requested" in c.value for c in at.caption)
        assert not [b for b in at.button if b.key == f"stop_{job.id}"]
        assert bar_of(at, job.id).endswith("elapsed, stopping")  # no time left promised any more
        assert store.heartbeat(job.id, 0.41, "scoring network step 41/100") is True  # the runner hears it
        store.finish_job(job.id, STOPPED, "stopped")  # and ends
        at.run()
        assert any(f"The scoring network was stopped (job {job.id}); start it again" in w.value for w in at.warning)
        assert [b for b in at.button if b.key == "importance_run"]
    finally:
        store.finish_job(job.id, STOPPED, "stopped")  # nothing left running in the shared store


def test_the_stop_button_stops_a_real_scoring_network_part_way(tiny_model, monkeypatch):
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)  # the thread below is the worker
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    job = api.submit("score", {"checkpoint": tiny_model, "method": "collaborative", "target": 0.8,
                               "scoring_steps": 100_000, "calibration_images": 4, "batch_size": 4})
    store = api.open_store()
    claim(job.id)
    ended: dict[str, str] = {}
    runner = threading.Thread(target=lambda: ended.setdefault("state", execute_job(store, job.id)), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while (latest := store.get_job(job.id)).eta_seconds is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert latest.state == RUNNING and latest.eta_seconds is not None, latest
        at = page(tiny_model)
        assert not at.exception and not at.error
        text = bar_of(at, job.id)
        assert "scoring network step" in text and " left" in text, text
        at.button(key=f"stop_{job.id}").click().run()
        assert not at.exception and not at.error
        runner.join(timeout=60)
        assert ended.get("state") == STOPPED
        assert 0 < store.get_job(job.id).progress < 1  # stopped part-way, not run to the end
        at.run()
        assert any(f"The scoring network was stopped (job {job.id})" in w.value for w in at.warning)
    finally:
        api.stop(job.id)
        runner.join(timeout=60)
