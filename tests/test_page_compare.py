"""The Compare page through AppTest: two models, per-class and per-image changes, cost, downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import REPO
from page_helpers import run_inline, settled
from core.models.checkpoint import save_checkpoint
from core.models.zoo import ModelSpec, build_model
from core.pruning.methods import resolve_method
from core.pruning.step import prune_step, pruning_context
from core.visual import class_colour_hex
from ui import background

TIMEOUT = 300
CLASSES = ["background", "scratch", "inclusion", "patch"]


@pytest.fixture(autouse=True)
def own_workspace(tmp_path, monkeypatch):
    """A run store of its own: other tests register models in the session's store."""
    monkeypatch.setenv("DEFECTPRUNE_WORKSPACE", str(tmp_path / "workspace"))


def page() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.switch_page("pages/views/compare.py")
    return at


def test_with_one_model_the_page_says_what_to_do():
    at = page()
    at.run()
    assert not at.exception
    assert any("needs two models" in info.value for info in at.info)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    """An untrained 64 px baseline and a copy pruned by half (no fine-tuning)."""
    folder = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    spec = ModelSpec(classes=CLASSES, input_size=(64, 64), in_channels=1, dataset_format="synthetic-steel")
    model = build_model(spec).eval()
    before = save_checkpoint(folder / "before", model, spec)
    batches = [(torch.randn(2, 1, 64, 64), torch.randint(0, 4, (2, 64, 64)))]
    step = prune_step(pruning_context(model, (64, 64), 1, batches, CLASSES), resolve_method("uniform-l1"), 0.5)
    after = save_checkpoint(folder / "after", model, spec, step.history)
    return str(before), str(after)


def charts(at: AppTest) -> dict[str, dict]:
    return {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
            for c in at.get("plotly_chart")}


def chart(at: AppTest, prefix: str) -> dict:
    return next(spec for title, spec in charts(at).items() if title.startswith(prefix))


def test_two_models_are_compared_with_cost_and_downloads(pair):
    before, after = pair
    at = page()
    at.session_state["model"] = before
    at.run()
    assert any("needs two models" in info.value for info in at.info)  # one model is not a comparison
    from core.runs import api

    store = api.open_store()
    store.register_model(after, arch="unet", encoder="resnet18", pruned=True)
    at.run()
    assert not at.exception and not at.error, at.error
    # drawn at once: both models predict in the server's background thread, a bar in their place
    assert any(bar.proto.text.startswith("Predicting both models") for bar in at.get("progress"))
    assert not at.get("plotly_chart") and not at.table
    settled(at)
    assert not at.exception and not at.error, at.error
    import re

    shown = {m.label: m.value for m in at.metric}  # IoU with one decimal
    assert re.fullmatch(r"\d+\.\d", shown["Defect mIoU before"]) and re.fullmatch(r"\d+\.\d", shown["Defect mIoU after"])
    titles = list(charts(at))
    assert any(t.startswith("IoU per defect class") for t in titles)
    assert any(t.startswith("Image ") for t in titles)
    cost = at.table[0].value
    assert list(cost.columns) == ["before", "after", "change", "speed-up"]
    assert cost.loc["MACs", "change"].startswith("-")  # the pruned model has fewer MACs
    assert cost.loc["MACs", "before"].endswith(" M")  # MACs in M or G, not raw counts
    for engine in ("fp32 torch", "fp32 ONNX Runtime"):  # median (p10-p90) and a speed-up factor per engine
        assert cost.loc[f"{engine} latency, median (p10-p90)", "after"].endswith(")")
        assert "x" in cost.loc[f"{engine} latency, median (p10-p90)", "speed-up"]
    assert len(at.get("download_button")) == 3
    assert not at.get("progress")  # the bars go once the comparison and the cost are drawn
    at.run()  # drawn from the kept results at once, with no bar
    assert not at.exception and not at.get("progress") and len(at.get("plotly_chart")) == 2


def test_bars_and_masks_use_the_class_colours_and_follow_the_widgets(pair):
    before, after = pair
    at = two_models_page(before, after)
    assert not at.exception and not at.error, [e.value for e in at.error]
    bars = chart(at, "IoU per defect class")
    colours = [class_colour_hex(i) for i in range(1, len(CLASSES))]
    assert [t["marker"]["color"] for t in bars["data"]] == [colours, colours]  # each class its own colour
    assert any("dp-chip" in h.proto.body and "scratch" in h.proto.body for h in at.get("html"))  # the legend
    at.selectbox(key="compare_before").set_value(after)
    settled(at.selectbox(key="compare_after").set_value(before).run())
    swapped = chart(at, "IoU per defect class")
    assert [t["y"] for t in swapped["data"]] == [t["y"] for t in reversed(bars["data"])]

    image = chart(at, "Image ")
    assert image["layout"]["annotations"][3]["text"].endswith(": all classes")
    changes = at.dataframe[1].value.set_index("class")
    assert list(changes.index) == ["all classes"] + CLASSES[1:]
    busiest = (changes["gained"] + changes["lost"]).drop("all classes").idxmax()
    settled(at.selectbox(key="compare_overlay").set_value(busiest).run())
    per_class = chart(at, "Image ")
    assert per_class["layout"]["annotations"][3]["text"].endswith(f": {busiest}")
    assert per_class["data"][3] != image["data"][3]  # the diff panel shows that class only
    assert per_class["data"][:3] == image["data"][:3]


def test_a_selected_row_survives_a_class_filter_that_shortens_the_table(pair):
    before, after = pair
    at = two_models_page(before, after)
    table = at.dataframe[0]
    last = len(table.value) - 1
    at.session_state[table.key] = {"selection": {"rows": [last]}}  # as a click on the last row
    at.run()
    assert chart(at, "Image ")["layout"]["title"]["text"].startswith(f"Image {table.value['index'].iloc[last]}:")
    settled(at.selectbox(key="compare_class").set_value("patch").run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    shorter = at.dataframe[0].value
    assert len(shorter) <= last  # the old row number is past its end
    # the new table's first image, not the old number's (which would name another image)
    assert chart(at, "Image ")["layout"]["title"]["text"].startswith(f"Image {shorter['index'].iloc[0]}:")


def test_the_onnx_offered_is_the_chosen_after_models(pair, monkeypatch):
    from core.runs import api

    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)  # the test runs the job itself
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)
    before, after = pair
    at = two_models_page(before, after)
    settled(at.selectbox(key="compare_after").set_value(after).run())
    settled(at.button(key="compare_export").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    labels = lambda: [b.proto.label for b in at.get("download_button")]  # noqa: E731
    job = api.list_jobs(kind="export")[0]  # the page exports in the worker, not in itself
    assert job.params["checkpoint"] == str(Path(after).resolve())
    assert "model.onnx" not in labels() and "Exporting ONNX" in at.get("progress")[0].proto.text
    run_inline(job.id)
    at.run()
    assert "model.onnx" in labels()
    assert "compare_export" not in [b.key for b in at.button]  # the download took the button's place
    settled(at.selectbox(key="compare_after").set_value(before).run())
    assert "model.onnx" not in labels()  # not the other model's export
    settled(at.selectbox(key="compare_after").set_value(after).run())
    assert "model.onnx" in labels()  # the same version's export is still good


def test_an_earlier_export_is_offered_at_once_and_carries_its_metadata(pair, monkeypatch):
    """One click: a fresh session (a refresh) offers the file exported earlier for this version
    of the after model, without exporting again; the file names classes, size and normalisation."""
    import onnx

    from core.runs import api

    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)
    before, after = pair
    at = two_models_page(before, after)
    settled(at.selectbox(key="compare_after").set_value(after).run())
    settled(at.button(key="compare_export").click().run())
    job = api.list_jobs(kind="export")[0]
    run_inline(job.id)
    fresh = page()
    fresh.session_state["model"] = before
    fresh.run()
    settled(fresh.selectbox(key="compare_after").set_value(after).run())
    assert not fresh.exception and not fresh.error, [e.value for e in fresh.error]
    assert "model.onnx" in [b.proto.label for b in fresh.get("download_button")]
    assert "compare_export" not in [b.key for b in fresh.button]  # nothing to click before the download
    assert len(api.list_jobs(kind="export")) == 1
    meta = {p.key: p.value for p in onnx.load(api.get_job(job.id).result["path"]).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["input_size"]) == [64, 64]
    assert (float(meta["mean"]), float(meta["std"])) == (0.5, 0.25)


@pytest.fixture()
def inline_worker(monkeypatch):
    """The test runs the page's jobs itself (page_helpers.run_inline)."""
    from core.runs import api

    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)
    return api


TINY = {"num_images": 24, "image_size": 64}  # the INT8 tests' dataset: calibrated and scored in seconds
INT8_ROWS = ["fp32 ONNX size", "INT8 ONNX size", "INT8 ONNX Runtime latency, median (p10-p90)",
             "INT8 speed-up over fp32 ONNX Runtime", "INT8 defect mIoU change from fp32"]


def test_the_int8_step_adds_its_rows_with_numbers_once_its_job_ran(pair, inline_worker):
    api = inline_worker
    before, after = pair
    at = two_models_page(before, after, TINY)
    settled(at.selectbox(key="compare_after").set_value(after).run())
    cost = at.table[0].value
    assert not [row for row in INT8_ROWS if row in cost.index]  # not measured on the first draw
    settled(at.button(key="compare_int8").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    (job,) = api.list_jobs(kind="int8-cost")  # measured in the worker, not in the page
    assert (job.params["before"], job.params["after"]) == (str(Path(before).resolve()), str(Path(after).resolve()))
    assert job.params["split"] == "val"
    assert "Measuring INT8" in at.get("progress")[0].proto.text
    assert "compare_int8" not in [b.key for b in at.button]  # its bar took the button's place
    run_inline(job.id)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    cost = at.table[0].value
    images = api.get_job(job.id).result["images"]
    for row in INT8_ROWS + [f"defect mIoU, INT8 ONNX Runtime (val, {images} images)"]:
        assert row in cost.index, list(cost.index)
    int8 = cost.loc["INT8 ONNX Runtime latency, median (p10-p90)"]
    assert int8["before"].endswith(")") and " ms (" in int8["after"] and "x" in int8["speed-up"]
    assert cost.loc["INT8 ONNX size", "after"].endswith(" MiB") and cost.loc["INT8 ONNX size", "change"].startswith("-")
    miou = cost.loc[f"defect mIoU, INT8 ONNX Runtime (val, {images} images)"]
    assert 0 <= float(miou["before"]) <= 100 and 0 <= float(miou["after"]) <= 100
    assert cost.loc["INT8 defect mIoU change from fp32", "before"].endswith(" pts")
    assert "compare_int8" not in [b.key for b in at.button] and not at.get("progress")
    assert any(f"the INT8 step (job {job.id})" in c.value for c in at.caption)
    fresh = two_models_page(before, after, TINY)  # a refresh: the step's rows at once, nothing measured again
    settled(fresh.selectbox(key="compare_after").set_value(after).run())
    assert "INT8 ONNX size" in fresh.table[0].value.index and len(api.list_jobs(kind="int8-cost")) == 1


def test_a_failed_int8_step_is_one_error_box_and_the_table_keeps_its_rows(pair, inline_worker, monkeypatch):
    import core.quantize
    from core.runs.worker import execute_job

    from page_helpers import claim

    api = inline_worker
    before, after = pair
    at = two_models_page(before, after, TINY)
    settled(at.selectbox(key="compare_after").set_value(after).run())
    settled(at.button(key="compare_int8").click().run())
    (job,) = api.list_jobs(kind="int8-cost")

    def broken(*_args, **_kwargs):
        raise core.quantize.QuantizationError("INT8 quantisation of model0.onnx failed: RuntimeError: no kernel")

    monkeypatch.setattr(core.quantize, "quantize_onnx", broken)
    claim(job.id)
    assert execute_job(api.open_store(), job.id) == "failed"
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "Measuring INT8 failed: INT8 quantisation of model0.onnx failed: RuntimeError: no kernel"]
    cost = at.table[0].value
    assert "fp32 ONNX Runtime latency, median (p10-p90)" in cost.index and "INT8 ONNX size" not in cost.index
    assert "compare_int8" in [b.key for b in at.button]  # it can be asked for again
    assert len(at.get("plotly_chart")) == 2  # the comparison above is still drawn


def test_the_export_choice_offers_the_int8_file_with_its_metadata(pair, inline_worker):
    import onnx

    api = inline_worker
    before, after = pair
    at = two_models_page(before, after, TINY)
    settled(at.selectbox(key="compare_after").set_value(after).run())
    labels = lambda: [b.proto.label for b in at.get("download_button")]  # noqa: E731
    settled(at.radio(key="compare_onnx_precision").set_value("INT8").run())
    assert at.button(key="compare_export").proto.label == "Export INT8 ONNX"
    settled(at.button(key="compare_export").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    (job,) = api.list_jobs(kind="export")
    assert job.params["int8"] is True and job.params["format"] == "synthetic-steel"
    assert job.params["option"] == TINY  # calibrated on the dataset the page compares on
    assert "Exporting INT8 ONNX" in at.get("progress")[0].proto.text
    run_inline(job.id)
    at.run()
    assert "model.int8.onnx" in labels() and "model.onnx" not in labels()
    path = api.get_job(job.id).result["path"]
    proto = onnx.load(path)
    assert "QuantizeLinear" in {node.op_type for node in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["input_size"]) == [64, 64]
    assert (float(meta["mean"]), float(meta["std"])) == (0.5, 0.25) and json.loads(meta["pruned"]) is True
    assert json.loads(meta["quantization"])["calibration_split"] == "train"
    settled(at.radio(key="compare_onnx_precision").set_value("fp32").run())
    assert "model.int8.onnx" not in labels() and at.button(key="compare_export").proto.label == "Export ONNX"
    other = two_models_page(before, after, {**TINY, "num_images": 30})  # another dataset: not its calibration
    settled(other.selectbox(key="compare_after").set_value(after).run())
    settled(other.radio(key="compare_onnx_precision").set_value("INT8").run())
    assert "model.int8.onnx" not in [b.proto.label for b in other.get("download_button")]
    assert other.button(key="compare_export").proto.label == "Export INT8 ONNX"


def test_a_pruned_model_that_is_not_faster_on_an_engine_is_flagged(pair, monkeypatch):
    import core.compare

    def cost_rows(paths, runs=10, threads=1):  # the after model: fewer MACs, slower on ONNX Runtime
        spread = lambda ms: dict(zip(("median_ms", "p10_ms", "p90_ms"), ms))  # noqa: E731
        measured = {"before": (1e9, spread((32.5, 31.0, 34.0)), spread((6.82, 6.7, 6.9))),
                    "after": (2e8, spread((13.9, 13.0, 15.0)), spread((7.58, 7.4, 7.8)))}
        return [{"checkpoint": path, "macs": macs, "params": 1e6, "size_bytes": 2**22,
                 "latency_torch_ms": torch_ms["median_ms"], "latency_ort_ms": ort["median_ms"],
                 "latency": {"torch": torch_ms, "onnxruntime": ort}}
                for path, (macs, torch_ms, ort) in zip(paths, (measured["before"], measured["after"]))]

    monkeypatch.setattr(core.compare, "cost_rows", cost_rows)
    background.clear()  # the server keeps each pair's cost: the measured ones of other tests are there
    before, after = pair
    at = two_models_page(before, after)
    settled(at.selectbox(key="compare_after").set_value(after).run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    cost = at.table[0].value
    assert cost.loc["fp32 ONNX Runtime latency, median (p10-p90)", "speed-up"] == "0.90x ⚠ not faster"
    assert cost.loc["fp32 torch latency, median (p10-p90)", "speed-up"] == "2.34x"
    assert [w.value for w in at.warning if "not faster on fp32 ONNX Runtime: 6.82 -> 7.58 ms" in w.value]
    background.clear()  # nor may these stand in for measured ones in later tests


def test_a_model_saved_again_at_the_same_path_is_compared_afresh(pair, tmp_path):
    before, _after = pair
    again = saved(tmp_path / "again")  # the same weights as before: nothing changes
    at = two_models_page(before, again)
    settled(at.selectbox(key="compare_after").set_value(again).run())
    assert (at.dataframe[0].value["change"] == 0).all()
    torch.manual_seed(1)
    spec = ModelSpec(classes=CLASSES, input_size=(64, 64), in_channels=1, dataset_format="synthetic-steel")
    save_checkpoint(again, build_model(spec).eval(), spec)  # retrained in place
    weights = Path(again, "weights.safetensors")
    os.utime(weights, (weights.stat().st_mtime + 10,) * 2)
    settled(at.run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert (at.dataframe[0].value["change"] != 0).any()


# ---------------------------------------------------------------- bad input
def saved(folder, classes=CLASSES, size=(64, 64)) -> str:
    torch.manual_seed(0)
    spec = ModelSpec(classes=classes, input_size=size, in_channels=1, dataset_format="synthetic-steel")
    return str(save_checkpoint(folder, build_model(spec).eval(), spec))


def two_models_page(before: str, after: str, options: dict | None = None) -> AppTest:
    """The page comparing ``before`` and ``after`` (registered) on synthetic steel, made with the
    format ``options`` where given (a smaller set: num_images, image_size)."""
    from core.runs import api

    store = api.open_store()
    for path in (before, after):
        store.register_model(path, arch="unet", encoder="resnet18")
    at = page()
    at.session_state["model"] = before
    if options is not None:
        at.session_state["dataset"] = {"format": "synthetic-steel", "root": None, "seed": 0,
                                       "options": json.dumps(options)}
    return settled(at.run())


@pytest.mark.parametrize("other, expected", [
    ({"classes": ["background", "crack"]}, "differ in classes"),
    ({"size": (96, 96)}, "input size (64, 64) against (96, 96)"),
])
def test_models_that_cannot_be_compared_are_refused_by_name(tmp_path, other, expected):
    before = saved(tmp_path / "before")
    after = saved(tmp_path / "after", **other)
    at = two_models_page(before, after)
    at.selectbox(key="compare_before").set_value(before)
    settled(at.selectbox(key="compare_after").set_value(after).run())
    assert not at.exception
    assert at.error and expected in at.error[0].value, [e.value for e in at.error]
    assert not at.get("plotly_chart")  # nothing drawn from a meaningless comparison
    assert at.selectbox(key="compare_before").value == before
    assert at.selectbox(key="compare_after").value == after
    assert at.session_state["model"] == before


def test_a_model_whose_checkpoint_was_damaged_shows_an_error(tmp_path):
    before = saved(tmp_path / "before")
    after = saved(tmp_path / "after")
    weights = Path(after, "weights.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    at = two_models_page(before, after)
    settled(at.selectbox(key="compare_after").set_value(after).run())
    assert not at.exception
    assert at.error and "not a readable safetensors file" in at.error[0].value, [e.value for e in at.error]
    assert at.selectbox(key="compare_after").value == after
    Path(after).rename(tmp_path / "moved")  # then the folder went away altogether
    at.run()
    assert not at.exception
    assert at.error and f"checkpoint folder {after} does not exist" in at.error[0].value


# ---------------------------------------------------------------- the workspace run
@pytest.fixture()
def no_comparison(monkeypatch):
    """The page stops at its comparison: these tests are about which models it compares."""
    import core.services.compare as service

    def refused(request, *_args, **_kwargs):
        raise service.CompareRequestError("not compared in this test")

    monkeypatch.setattr(service, "checked_specs", refused)  # the page's first check, before any work


def run_page(run_id: int, model: str) -> AppTest:
    at = page()
    at.session_state["model"] = model
    at.session_state["run"] = run_id
    at.run()
    assert not at.exception
    return at


def test_the_workspace_run_preselects_its_start_and_the_result_it_recommends(tmp_path, no_comparison):
    from test_page_prune import stored_run

    start, other = saved(tmp_path / "start"), saved(tmp_path / "other")
    rounds = [saved(tmp_path / f"round_{i}") for i in (1, 2)]
    recovered = saved(tmp_path / "recovered")
    job_id = stored_run(start, "uniform-l1", [49.0, 48.0], checkpoints=rounds, result={
        "checkpoint": recovered, "recovery": {"from_round": 2, "checkpoint": recovered, "defect_miou": 49.5}})
    at = run_page(job_id, other)  # a run in the workspace (e.g. from the address), the user's model another
    assert at.selectbox(key="compare_before").value == start
    assert at.selectbox(key="compare_after").value == recovered  # the result, past the last kept round
    assert any(c.value.startswith(f"Run #{job_id}: before is its starting model, after is its result (round 2 "
                                  "after its recovery phase)") for c in at.caption)
    plain = stored_run(start, "uniform-l1", [49.0, 48.0], checkpoints=rounds,
                       result={"checkpoint": rounds[1]})  # no recovery: its last kept round is its result
    at = run_page(plain, other)
    assert (at.selectbox(key="compare_before").value, at.selectbox(key="compare_after").value) == (start, rounds[1])
    assert any("after is its result (round 2)" in c.value for c in at.caption)


def test_a_run_that_kept_no_round_preselects_only_its_start(tmp_path, no_comparison):
    from core.runs import api
    from test_page_prune import stored_run

    start, other = saved(tmp_path / "start"), saved(tmp_path / "other")
    api.open_store().register_model(other, arch="unet", encoder="resnet18")
    job_id = stored_run(start, "uniform-l1", [40.0], accepted=[False], result={"checkpoint": None})
    at = run_page(job_id, other)
    assert at.selectbox(key="compare_before").value == start
    assert any(i.value.startswith(f"Run #{job_id} has no kept round (its result is the unpruned model)")
               for i in at.info)
