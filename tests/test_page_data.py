"""The Data page through Streamlit's AppTest: renders, switches dataset, shows errors as boxes."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO

TIMEOUT = 180


@pytest.fixture()
def app() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def test_data_page_renders_the_synthetic_default(app):
    assert app.title[0].value == "Data"
    assert not app.error
    images = app.get("image")
    assert images, "the sample grid shows images"
    titles = [spec["layout"]["title"]["text"] for spec in plotly_specs(app)]
    assert "Images per defect class" in titles
    bars = next(s for s in plotly_specs(app) if s["layout"]["title"]["text"] == "Images per defect class")
    assert {trace["name"] for trace in bars["data"]} == {"scratch", "inclusion", "patch"}
    assert app.session_state["dataset"]["format"] == "synthetic-steel"


def test_the_page_says_what_training_with_the_defaults_does_and_how_long_it_took(app):
    from core.services.train import DEMO_MEASURED, SYNTHETIC_TRAINING

    infos = [box.value for box in app.info if "Training with the defaults" in box.value]
    assert len(infos) == 1
    from core.data.synthetic import DEFAULT_IMAGE_SIZE as px

    assert f"{SYNTHETIC_TRAINING['epochs']} epochs" in infos[0] and f"{px}x{px} px" in infos[0]
    assert DEMO_MEASURED.sentence() in infos[0]  # the measured time and mIoU, from one constant
    app.selectbox(key="data_family").set_value("synthetic-fabric").run()
    infos = [box.value for box in app.info if "Training with the defaults" in box.value]
    assert len(infos) == 1 and f"on {DEMO_MEASURED.format} the same settings" in infos[0]


def test_switching_the_family_re_renders(app):
    app.selectbox(key="data_family").set_value("synthetic-tile").run()
    assert not app.exception and not app.error
    bars = next(s for s in plotly_specs(app) if s["layout"]["title"]["text"] == "Images per defect class")
    assert "blowhole" in {trace["name"] for trace in bars["data"]}
    assert app.session_state["dataset"]["format"] == "synthetic-tile"


def test_a_broken_path_shows_an_error_box_and_keeps_the_dataset(app, tmp_path):
    app.radio(key="data_source").set_value("Real dataset on disk").run()
    app.selectbox(key="data_format").set_value("neu-seg")
    app.text_input(key="data_path").input(str(tmp_path / "does-not-exist"))
    app.button[0].click().run()
    assert not app.exception
    assert app.error and "does not exist" in app.error[0].value
    assert app.session_state["dataset"]["format"] == "synthetic-steel"  # nothing lost
    assert app.get("image")  # the earlier dataset is still shown


def test_a_path_outside_the_data_roots_is_refused(app):
    app.radio(key="data_source").set_value("Real dataset on disk").run()
    app.text_input(key="data_path").input("/etc")
    app.button[0].click().run()
    assert app.error and "outside the configured data roots" in app.error[0].value


def test_a_corrupt_image_shows_an_error_box(app, tmp_path):
    root = tmp_path / "neu"
    for split in ("train", "val", "test"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        image = np.full((32, 32), 120, np.uint8)
        cv2.imwrite(str(root / "img_dir" / split / "000001.jpg"), image)
        cv2.imwrite(str(root / "ann_dir" / split / "000001.png"), np.zeros((32, 32), np.uint8))
    (root / "img_dir" / "train" / "000002.jpg").write_bytes(b"not a jpeg at all")
    cv2.imwrite(str(root / "ann_dir" / "train" / "000002.png"), np.zeros((32, 32), np.uint8))
    app.radio(key="data_source").set_value("Real dataset on disk").run()
    app.selectbox(key="data_format").set_value("neu-seg")
    app.text_input(key="data_path").input(str(root))
    app.button[0].click().run()
    assert not app.exception
    assert app.error and "000002.jpg" in app.error[0].value


def test_bad_format_options_show_an_error_box(app, tmp_path):
    app.radio(key="data_source").set_value("Real dataset on disk").run()
    app.selectbox(key="data_format").set_value("mvtec")
    app.text_input(key="data_path").input(str(tmp_path))
    app.text_input(key="data_options").input("{category: bottle")
    app.button[0].click().run()
    assert not app.exception
    assert app.error and "not valid JSON" in app.error[0].value


def test_pressing_unpack_without_an_upload_says_so_and_keeps_the_dataset(app):
    app.radio(key="data_source").set_value("Upload a zip").run()
    app.button[0].click().run()
    assert not app.exception and not app.error
    assert app.warning and "No zip has arrived yet" in app.warning[0].value
    assert app.session_state["dataset"]["format"] == "synthetic-steel"
