"""The Filter correlation page through AppTest."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from page_helpers import chart_titles, open_page, tiny_steel_model



@pytest.fixture()
def tiny_model(tmp_path) -> str:
    return tiny_steel_model(tmp_path)


def page(model: str | None = None) -> AppTest:
    return open_page("correlation", model)


def titles(at: AppTest) -> dict[str, dict]:
    return chart_titles(at)


def values(array) -> np.ndarray:
    """A plotly array from a chart's JSON: a list, or numpy's base64 form (``bdata``)."""
    if isinstance(array, dict):
        import base64

        flat = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        shape = [int(n) for n in str(array.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(array)


def bars(at: AppTest, title_start: str) -> dict:
    [trace] = next(v for k, v in titles(at).items() if k.startswith(title_start))["data"]  # one trace
    return trace

def test_without_a_model_the_page_says_what_to_do():
    assert any("No model yet" in info.value for info in page().info)


def test_heatmap_bars_and_selections_follow_the_widgets(tiny_model, monkeypatch):
    import core.importance.inspect as inspect

    measured = []  # the forward passes over calibration images, one entry per call
    real = inspect.measure_group
    monkeypatch.setattr(inspect, "measure_group", lambda *a, **k: measured.append(a[2]) or real(*a, **k))
    at = page(tiny_model)
    assert not at.error
    charts = titles(at)
    heat = next(v for k, v in charts.items() if k.startswith("|correlation|"))
    assert heat["data"][0]["type"] == "heatmap"
    scores = next(v for k, v in charts.items() if k.startswith("Combined score S = c(1 - 0.5 s)"))
    at.slider(key="correlation_beta").set_value(1.0).run()
    rescored = next(v for k, v in titles(at).items() if k.startswith("Combined score S = c(1 - 1 s)"))
    assert [t["y"] for t in rescored["data"]] != [t["y"] for t in scores["data"]]  # S itself changed
    at.slider(key="correlation_remove").set_value(3).run()
    assert len(measured) == 1, measured  # beta and the count rescore the cached measurement
    at.selectbox(key="correlation_group").set_value("encoder.layer1.0.conv1").run()
    assert not at.exception and not at.error
    assert measured[-1] == "encoder.layer1.0.conv1" and len(measured) == 2
    heat = next(v for k, v in titles(at).items() if k.startswith("|correlation|"))
    assert values(heat["data"][0]["z"]).shape == (64, 64)  # that layer's 64 filters, one cell each
    # both bar charts keep the heatmap's (clustered) filter order: one trace, no kept/removed split
    l1, combined = bars(at, "L1 contribution"), bars(at, "Combined score")
    assert list(l1["text"]) == list(combined["text"]) and len(set(l1["text"])) == 64
    assert heat["layout"]["xaxis"]["ticktext"] == list(l1["text"])
    colours = values(combined["marker"]["color"])
    assert list(colours).count("#e63946") == at.slider(key="correlation_remove").value
    counts = {m.label: int(m.value) for m in at.metric}
    remove = at.slider(key="correlation_remove").value
    # each method removes exactly the slider's count
    assert counts["Removed by L1 only"] + counts["Removed by both"] == remove
    assert counts["Removed by the method only"] + counts["Removed by both"] == remove


def test_a_wide_layer_is_drawn_in_blocks_and_its_bars_name_no_filter_on_the_axis(tiny_model):
    at = page(tiny_model)
    at.selectbox(key="correlation_group").set_value("encoder.layer4.0.conv1").run()  # 512 filters
    assert not at.exception and not at.error
    [title] = [k for k in titles(at) if k.startswith("|correlation|")]
    heat = titles(at)[title]
    z = values(heat["data"][0]["z"])
    assert z.shape == (128, 128) and "largest |R| in a block of 4 x 4 filters" in title
    assert np.allclose(np.diag(z), 1.0, atol=1e-3)  # each diagonal block holds a filter's |R| with itself
    removed = heat["data"][1]
    assert len(removed["x"]) == at.slider(key="correlation_remove").value and max(removed["x"]) < 512
    l1_figure = next(v for k, v in titles(at).items() if k.startswith("L1 contribution"))
    assert "ticktext" not in heat["layout"]["xaxis"] and "ticktext" not in l1_figure["layout"]["xaxis"]
    assert len(bars(at, "L1 contribution")["text"]) == 512


def test_the_weight_cosine_source_reads_no_images_and_is_labelled(tiny_model, monkeypatch):
    import core.importance.substitutability as substitutability

    at = page(tiny_model)
    responses = next(v for k, v in titles(at).items() if k.startswith("|correlation|"))
    monkeypatch.setattr(substitutability, "collect_correlations",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("images were read")))
    at.radio(key="correlation_source").set_value("weights").run()
    assert not at.exception and not at.error
    title, heat = next((k, v) for k, v in titles(at).items() if k.startswith("|correlation|"))
    assert "weight cosine (no data)" in title
    assert heat["data"][0]["z"] != responses["data"][0]["z"]


# ---------------------------------------------------------------- bad input
def tiny_neu_seg(root: Path, per_split: int = 4) -> Path:
    """A NEU-Seg-layout folder of a few 64 px grey images with one defect square each."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(per_split):
            image = rng.integers(80, 160, (64, 64), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            mask[16:32, 16:32] = 1 + i % 3
            cv2.imwrite(str(root / "img_dir" / split / f"{split}_{i}.jpg"), image)
            cv2.imwrite(str(root / "ann_dir" / split / f"{split}_{i}.png"), mask)
    return root


def test_a_dataset_folder_that_vanished_shows_an_error_and_keeps_the_choices(tiny_model, tmp_path):
    root = tiny_neu_seg(tmp_path / "neu")
    at = open_page("correlation", tiny_model, run=False)
    at.session_state["dataset"] = {"format": "neu-seg", "root": str(root), "seed": 0, "options": ""}
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.selectbox(key="correlation_group").set_value("encoder.layer1.0.conv1").run()
    shutil.rmtree(root)  # deleted while the dashboard had it open
    at.run()
    assert not at.exception
    assert at.error and f"dataset folder {root} does not exist (any more)" in at.error[0].value, at.error
    assert at.session_state["dataset"]["root"] == str(root)
    assert at.session_state["model"] == tiny_model
    assert at.selectbox(key="correlation_group").value == "encoder.layer1.0.conv1"


def test_a_checkpoint_without_its_weights_shows_an_error(tiny_model):
    at = page(tiny_model)
    Path(tiny_model, "weights.safetensors").unlink()
    at.run()
    assert not at.exception
    assert at.error and "weights.safetensors is missing" in at.error[0].value, [e.value for e in at.error]
    assert any("Repair or replace that checkpoint" in info.value for info in at.info)
    assert at.session_state["model"] == tiny_model
