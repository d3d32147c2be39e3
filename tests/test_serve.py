"""ui.serve: the dashboard's server starts with what its pages import already imported."""

from __future__ import annotations

import gc
import sys

from conftest import REPO
from ui import serve


def test_the_modules_preloaded_are_those_the_pages_import(tmp_path):
    modules = serve.page_modules()
    for needed in ("torch", "plotly.express", "streamlit", "core.services.compare", "core.live", "ui.state"):
        assert needed in modules
    assert "__future__" not in modules and "ui.serve" not in modules
    # read off the pages: a module a page starts importing (here inside a function) joins the list
    (tmp_path / "pages" / "views").mkdir(parents=True)
    (tmp_path / "ui").mkdir()
    (tmp_path / "app.py").write_text("import streamlit as st\n")
    (tmp_path / "pages" / "views" / "new.py").write_text("def f():\n    from core.allocation.latency import X\n")
    assert serve.page_modules(tmp_path) == ["core.allocation.latency", "streamlit"]


def test_a_module_that_fails_to_import_is_left_to_its_page():
    assert serve.preload(["json", "no_such_module_here"]) == ["no_such_module_here"]


def test_the_server_is_streamlit_run_on_app_py_with_the_options_given(monkeypatch):
    import streamlit.web.cli as cli

    seen = {}
    monkeypatch.setattr(serve, "page_modules", lambda: ["json"])
    monkeypatch.setattr(serve, "warm_first_page", lambda: seen.setdefault("warmed", True))
    monkeypatch.setattr(cli, "main", lambda: seen.setdefault("argv", list(sys.argv)) and 0)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert serve.main(["--server.port", "8600"]) == 0
    assert seen["argv"] == ["streamlit", "run", str(REPO / "app.py"), "--server.port", "8600"]
    assert "onnxruntime" in sys.modules  # imported inside core's functions: preloaded by name
    assert seen["warmed"] and gc.get_freeze_count() > 0  # out of the collector Streamlit runs after every run
    gc.unfreeze()


def test_the_first_page_is_warmed_on_the_data_pages_own_cache(monkeypatch):
    import ui.state

    asked = []
    monkeypatch.setattr(ui.state, "cached_index", lambda *args: asked.append(args))
    serve.warm_first_page()
    assert asked == [(ui.state.DEFAULT_FORMAT, None, 0, "")]  # the default dataset, keyed as the Data page keys it
