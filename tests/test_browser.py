"""End to end in a real browser (Debian's Chromium driven by Playwright): choose a synthetic
dataset, train a tiny baseline, run one prune round, open Compare and see images and the cost
table. With DEFECTPRUNE_SCREENSHOTS=<folder> it also saves a screenshot of every page there
(`scripts/screenshots` does that for the README)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.timeout(900)


def require_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("browser test needs Debian's chromium: `apt-get install chromium` (.ci/run installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("browser test needs the playwright package (requirements-test.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    require_browser()
    port = free_port()
    env = dict(os.environ, DEFECTPRUNE_WORKSPACE=str(tmp_path / "workspace"), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the dashboard did not start within 90 s")
    yield url
    os.killpg(process.pid, 9)
    subprocess.run([sys.executable, "-m", "core", "jobs", "list"], cwd=REPO, env=env, capture_output=True)
    for line in subprocess.run(["pgrep", "-f", str(tmp_path / "workspace")], capture_output=True,
                               text=True).stdout.split():
        try:
            os.kill(int(line), 9)  # the worker the dashboard started
        except (ProcessLookupError, ValueError):
            pass


def test_dataset_to_compare_in_a_browser(server):
    from playwright.sync_api import expect, sync_playwright

    shots = os.environ.get("DEFECTPRUNE_SCREENSHOTS")
    # the test trains for 1 epoch at 64 px; the README's screenshots show a model worth looking at
    # (and a tolerance wide enough for its rounds to be kept, so the frontier has points)
    epochs, finetune_epochs, rounds, tolerance = ("12", "2", "2", "10") if shots else ("1", "0", "1", "1")
    expect.set_options(timeout=120_000)  # pages load models and datasets on a 2-core CPU

    def check(page, name: str) -> None:
        """No Streamlit exception box on the page; with screenshots asked for, the whole page
        (Streamlit scrolls inside its main block, so the window grows to its height first)."""
        expect(page.locator("[data-testid=stException]")).to_have_count(0)
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.wait_for_timeout(2000)
            height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
            page.set_viewport_size({"width": 1400, "height": min(max(int(height), 1000), 4000)})
            page.wait_for_timeout(1500)
            page.screenshot(path=str(Path(shots) / f"{name}.png"))
            page.set_viewport_size({"width": 1400, "height": 1000})

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(server)
        expect(page.get_by_text("Per-class statistics")).to_be_visible()
        page.get_by_label("Surface family").click()
        page.get_by_role("option", name="synthetic-metal").click()
        expect(page.get_by_text("Workspace")).to_be_visible()
        expect(page.get_by_text("Dataset: synthetic-metal")).to_be_visible()
        expect(page.locator("img").first).to_be_visible()
        check(page, "data")

        page.get_by_role("link", name="Model").click()
        expect(page.get_by_text("No model yet")).to_be_visible()
        page.get_by_label("Input size (N or HxW)").fill("64")
        page.get_by_label("Epochs (early stopping on val defect mIoU)").fill(epochs)
        page.get_by_role("button", name="Train in the background").click()
        page.get_by_role("button", name="Use this model").first.click(timeout=400_000)
        expect(page.get_by_text("Predictions on validation images")).to_be_visible()
        check(page, "model")

        page.get_by_role("link", name="Layer importance").click()
        expect(page.get_by_text("Live pruning-ratio tuning", exact=True)).to_be_visible()  # the caption says it too
        if shots:  # the scoring network's charts (a background job of a minute or two)
            page.get_by_role("button", name="Run the scoring network (background job)").click()
            expect(page.get_by_text("Layer x defect-class importance")).to_be_visible(timeout=600_000)
        check(page, "importance")
        page.get_by_role("link", name="Filter correlation").click()
        expect(page.get_by_text("Removed by both")).to_be_visible()
        check(page, "correlation")

        page.get_by_role("link", name="Prune").click()
        page.get_by_label("Method").click()
        page.get_by_role("option", name="uniform-l1", exact=False).click()
        page.get_by_label("Tolerance (defect-mIoU points)").fill(tolerance)
        page.get_by_label("Fine-tune epochs per round").fill(finetune_epochs)
        page.get_by_label("Round limit").fill(rounds)
        page.get_by_role("button", name="Launch in the background").click()
        expect(page.get_by_text("Validation defect mIoU against MACs, round by round")).to_be_visible(timeout=400_000)
        check(page, "prune")

        page.get_by_role("link", name="Compare").click()
        expect(page.get_by_text("zoom one panel, the others follow")).to_be_visible(timeout=300_000)
        expect(page.get_by_role("rowheader", name="ONNX Runtime latency", exact=False)).to_be_visible(timeout=300_000)  # the cost table
        expect(page.get_by_role("button", name="Pruned checkpoint (zip)")).to_be_visible()
        check(page, "compare")
        browser.close()


def test_a_zip_uploaded_in_the_browser_becomes_the_dataset(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from test_upload import dataset_zip

    archive = tmp_path / "scratches.zip"
    archive.write_bytes(dataset_zip().getvalue())
    expect.set_options(timeout=120_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        expect(page.get_by_text("Per-class statistics")).to_be_visible()
        page.get_by_text("Upload a zip").click()
        page.locator("input[type=file]").set_input_files(str(archive))
        expect(page.get_by_text(re.compile(r"^\d+(\.\d+)?\s?[KMG]?B$"))).to_be_visible()  # the file's size
        # A press before the browser has handed the finished upload to the form submits it
        # without the file; the page says so and a second press loads it, as a user would do.
        button, loaded = page.get_by_role("button", name="Unpack and load"), page.get_by_text("Dataset: folder")
        button.click()
        early = page.get_by_text("No zip has arrived yet")
        expect(loaded.or_(early)).to_be_visible()
        if early.is_visible():
            button.click()
        expect(loaded).to_be_visible()
        expect(page.get_by_text("000.png", exact=False).first).to_be_visible()
        browser.close()
