"""Start the dashboard server with the engine already imported:

    python -m ui.serve [streamlit run options, e.g. --server.port 8501]

Streamlit runs every page in the server's own process, so the first page opened after a plain
``streamlit run app.py`` pays for importing torch, Torch-Pruning, segmentation-models-pytorch,
ONNX Runtime and plotly (5 s of the 3 s a page may take, bench/results/ui_pages.md). Here those
imports, and the first convolution's one-time set-up, happen before the server listens: the
health endpoint answers once a page can open at warm speed. The objects they made are then
frozen out of the garbage collector, which Streamlit runs after every script run. What is
imported is read off the pages themselves (every module they import, at any depth of their
code), so a page that starts using a new module has it preloaded without a list to keep.
"""

from __future__ import annotations

import ast
import gc
import importlib
import io
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
log = logging.getLogger("defectprune.serve")
# imported inside core's functions, not by a page: ONNX export and ONNX Runtime timing (Compare)
ENGINE_MODULES = ["onnx", "onnxruntime"]


def page_modules(repo: Path = REPO) -> list[str]:
    """Every absolute module the dashboard's scripts import (app.py, pages/views/*.py, ui/*.py),
    at module level or inside their functions."""
    names: set[str] = set()
    scripts = [repo / "app.py", *sorted((repo / "pages" / "views").glob("*.py")), *sorted((repo / "ui").glob("*.py"))]
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    names.discard("__future__")
    names.discard(__name__)
    return sorted(names)


def preload(modules: list[str]) -> list[str]:
    """Import ``modules``; one that fails is logged and left for its page to report (in the
    page's own error box, as without preloading). Returns those that failed."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a page shows it when opened; the server still starts
            log.warning("could not preload %s: %s", name, exc)
            failed.append(name)
    return failed


def warm_torch() -> None:
    """One small convolution forward and backward: the CPU kernels' one-time set-up is paid here,
    not by the first preview or comparison."""
    import torch

    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    conv(torch.zeros(1, 3, 32, 32)).sum().backward()
    with torch.inference_mode():
        conv(torch.zeros(1, 3, 32, 32))


def warm_first_page() -> None:
    """What the first page run pays once: the default dataset's index (read and checked, as
    the Data page's cached index: the same cache, filled here), plotly's first figure and
    its JSON, and the first image encoded for the browser."""
    import numpy as np
    import plotly.express as px
    from PIL import Image

    from ui.state import DatasetChoice, cached_index

    choice = DatasetChoice()
    cached_index(choice.format, choice.root, choice.seed, choice.options)
    px.bar(x=["a", "b"], y=[1, 2], color=["a", "b"]).to_json()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(io.BytesIO(), format="PNG")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    modules = page_modules() + ENGINE_MODULES
    failed = preload(modules)
    if "torch" not in failed:
        warm_torch()
    try:
        warm_first_page()
    except Exception as exc:  # noqa: BLE001 - the Data page reports a dataset it cannot read, in its error box
        log.warning("could not warm the first page: %s", exc)
    # Streamlit collects garbage after every script run (runner.postScriptGC): over the half
    # million objects of torch, timm, plotly and the rest, that full collection held the GIL
    # 270 ms after every click, slider move and poll. Frozen, they are left out of it (they
    # live as long as the server); what the pages make afterwards is still collected.
    gc.freeze()
    log.info("preloaded %d modules in %.1f s (%d objects frozen out of the collector)", len(modules) - len(failed),
             time.perf_counter() - start, gc.get_freeze_count())
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *(sys.argv[1:] if argv is None else argv)]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
