"""Time the dashboard's pages in a real browser against the dashboard's targets: every page
opens within 3 s on the demo model, a slider move answers within 300 ms on the server, a
preview within 2 s. (bench/ui.py times the Layer importance page's live answers in-process.)

    .venv/bin/python bench/ui_pages.py [--epochs 1] [--limit 64] [--repeats 3]

It builds a workspace under bench/cache/ui_pages/ (git-ignored): a baseline trained on the
default dataset (synthetic-steel) and one prune round of it, both run as the dashboard's own
jobs (so the Compare page lists them); starts the dashboard's server on it (`python -m ui.serve`,
as scripts/dashboard does); and drives Debian's Chromium with Playwright. Each page is opened
by its address with the workspace in the query parameters (``?model=...&format=...``), as a
shared link or F5 does.

What is timed: from the action (navigation, a click, a key press) to the moment the browser
receives the server's "script finished" message for that run (Streamlit's ForwardMsg, read off
the page's websocket): the server's whole answer as the user waits for it, transfers included;
then, separately, until the page has drawn (no element left stale, two animation frames).
"Cold" is a page's first open after the server started (models loaded, graphs traced, caches
filled); "warm" its open in a new browser session afterwards. Writes bench/results/ui_pages.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.dashboard import DashboardStartError, free_port, start_streamlit  # noqa: E402

CACHE = REPO / "bench" / "cache" / "ui_pages"
WORKSPACE = CACHE / "workspace"
os.environ["DEFECTPRUNE_WORKSPACE"] = str(WORKSPACE)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OPEN_LIMIT_S, MOVE_LIMIT_S, PREVIEW_LIMIT_S = 3.0, 0.3, 2.0
COST_ROW = "fp32 torch latency, median (p10-p90)"  # Compare's cost table is drawn
PAGES = {"Data": "", "Model": "model", "Layer importance": "importance", "Filter correlation": "correlation",
         "Prune": "prune", "Compare": "compare"}


def build_workspace(args: argparse.Namespace) -> tuple[str, str]:
    """A baseline and its pruned round, as dashboard jobs in the workspace (made once)."""
    from core.runs import api
    from core.runs.store import SUCCEEDED
    from core.runs.worker import execute_job

    store = api.open_store()
    done = {job.kind: job for job in reversed(store.list_jobs(states=[SUCCEEDED]))}
    if "train" not in done:
        job = api.submit("train", {"format": "synthetic-steel", "epochs": args.epochs, "limit": args.limit,
                                   "threads": args.threads, "seed": 0}, store)
        store.claim_next_job(worker_pid=os.getpid())
        if execute_job(store, job.id) != SUCCEEDED:
            raise SystemExit(f"training failed: {store.get_job(job.id).error}")
        done["train"] = store.get_job(job.id)
    baseline = done["train"].result["checkpoint"]
    if "prune" not in done:
        job = api.submit("prune", {"checkpoint": baseline, "method": "uniform-l1", "max_rounds": 1, "finetune_epochs": 0,
                                   "tolerance": 100.0, "target_macs": 0.5, "threads": args.threads}, store)
        store.claim_next_job(worker_pid=os.getpid())
        if execute_job(store, job.id) != SUCCEEDED:
            raise SystemExit(f"the prune run failed: {store.get_job(job.id).error}")
        done["prune"] = store.get_job(job.id)
    return baseline, str(done["prune"].id)


TRACE = CACHE / "runs.trace"  # the server's own answer times (bench/traced_server.py)


def start_server() -> tuple[subprocess.Popen, str]:
    TRACE.unlink(missing_ok=True)
    try:
        return start_streamlit(free_port(), dict(os.environ, OMP_NUM_THREADS="1", DEFECTPRUNE_RUN_TRACE=str(TRACE)),
                               module="bench.traced_server")
    except DashboardStartError as exc:
        raise SystemExit(str(exc)) from None


def server_answer(since: float) -> float | None:
    """The server's answer to the first rerun requested after ``since`` (unix time): from the
    request arriving to its "script finished" message leaving (the trace of traced_server)."""
    if not TRACE.is_file():
        return None
    events = [(float(t), event) for t, event in (line.split() for line in TRACE.read_text().splitlines())]
    requested = next((t for t, event in events if event == "request" and t >= since), None)
    finished = next((t for t, event in events if event == "finished" and requested is not None and t >= requested),
                    None)
    return None if finished is None else finished - requested


class Timer:
    """Times a browser page's reruns by the server's "script finished" messages."""

    def __init__(self, page):
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.page, self.finished = page, []

        def frame(payload) -> None:
            if isinstance(payload, (bytes, bytearray)):
                msg = ForwardMsg()
                try:
                    msg.ParseFromString(bytes(payload))
                except Exception:  # noqa: BLE001 - not every frame is a ForwardMsg
                    return
                if msg.WhichOneof("type") == "script_finished":
                    self.finished.append(time.perf_counter())

        page.on("websocket", lambda ws: ws.on("framereceived", frame))

    def time(self, action, timeout_s: float = 300.0, until=None) -> tuple[float, float, float | None]:
        """(seconds to the server's answer, seconds until the page has drawn it). With
        ``until`` (a locator), drawn is when that is visible: work the page finishes in the
        background after its answer (Compare's comparison and cost) counts."""
        seen = len(self.finished)
        start, wall = time.perf_counter(), time.time()
        action()
        while len(self.finished) == seen:
            if time.perf_counter() - start > timeout_s:
                raise SystemExit(f"no answer within {timeout_s:.0f} s")
            self.page.wait_for_timeout(10)
        answered = self.finished[seen] - start
        self.page.wait_for_function(
            "() => !document.querySelector('[data-stale=true]') && "
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
        drawn = time.perf_counter() - start
        if until is not None:
            until.first.wait_for(state="visible", timeout=timeout_s * 1000)
            drawn = time.perf_counter() - start
        if self.page.locator("[data-testid=stException]").count():
            raise SystemExit("a page showed an exception")
        return answered, drawn, server_answer(wall)


def measure(url: str, query: str, repeats: int) -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows: list[dict] = []

    def add(case: str, limit: float | None, times: list[tuple], judged: str = "answer") -> None:
        """``judged``: which time the limit is held against (drawn: what the page finishes
        after its answer is what the user waits for; server: the server's own answer, for the
        targets set "on the server")."""
        rows.append({"case": case, "limit_s": limit, "answer_s": [t[0] for t in times],
                     "drawn_s": [t[1] for t in times], "server_s": [t[2] for t in times if t[2] is not None],
                     "judged": judged})

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])

        def session():
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            return page, Timer(page)

        for label, path in PAGES.items():  # cold: the first open of each page after the server started
            page, timer = session()
            start = time.perf_counter()
            cold = timer.time(lambda: page.goto(f"{url}/{path}?{query}"))
            complete = None
            if label == "Compare":  # drawn at once; its comparison and cost follow from the background
                page.get_by_text(COST_ROW, exact=True).first.wait_for(state="visible", timeout=300_000)
                complete = time.perf_counter() - start
            warm = []
            for _ in range(repeats):  # a new session each time: F5 or a shared link
                again, again_timer = session()
                warm.append(again_timer.time(lambda: again.goto(f"{url}/{path}?{query}")))
                again.close()
            add(f"open {label} (cold)", OPEN_LIMIT_S, [cold])
            if complete is not None:
                add(f"open {label} (cold), until its comparison and cost are drawn", None, [(complete, complete, None)])
            add(f"open {label} (warm)", OPEN_LIMIT_S, warm)
            page.close()

        page, timer = session()
        timer.time(lambda: page.goto(f"{url}/importance?{query}"))
        add("Layer importance: switch to the global allocator", MOVE_LIMIT_S,
            [timer.time(lambda: page.get_by_text("global (L1)", exact=True).click())], judged="server")
        slider = page.get_by_role("slider", name="Fewer MACs")
        add("Layer importance: move the target slider", MOVE_LIMIT_S,
            [timer.time(lambda key=key: (slider.focus(), page.keyboard.press(key)))
             for key in ["ArrowLeft", "ArrowRight"] * repeats], judged="server")
        add("Layer importance: preview", PREVIEW_LIMIT_S,
            [timer.time(lambda: page.get_by_role("button", name="Preview this setting").click())
             for _ in range(repeats)])

        timer.time(lambda: page.goto(f"{url}/correlation?{query}"))
        beta = page.get_by_role("slider", name="beta (weight of substitutability)")
        add("Filter correlation: move beta", MOVE_LIMIT_S,
            [timer.time(lambda key=key: (beta.focus(), page.keyboard.press(key)))
             for key in ["ArrowRight", "ArrowLeft"] * repeats], judged="server")
        layers = []
        for option in ("encoder.layer4.0.conv1", "encoder.layer2.0.conv1", "decoder.blocks.0.conv1"):
            def switch(option=option):
                page.get_by_label("Layer (prunable group, network order)").click()
                page.get_by_role("option", name=option, exact=False).first.click()
            layers.append(timer.time(switch))
        add("Filter correlation: switch layer (first visit of each)", OPEN_LIMIT_S, layers)

        # Compare draws at once and fills in its comparison and cost from the server's background
        # thread: opened in a new session (the comparison of this pair is kept from the cold open)
        # and timed until the cost table is there; then each split switch until that split's chart
        cost_table = page.get_by_text(COST_ROW, exact=True)
        add("Compare: open until the comparison and cost are drawn (warm)", OPEN_LIMIT_S,
            [timer.time(lambda: page.goto(f"{url}/compare?{query}"), until=cost_table)], judged="drawn")
        splits = []
        for split in ["test", "val"] * repeats:
            def choose(split=split):
                page.get_by_label("Split").click()
                page.get_by_role("option", name=split, exact=True).click()
            splits.append(timer.time(choose, until=page.get_by_text(f"IoU per defect class on {split} (%)")))
        add("Compare: switch split (val/test), until its chart is drawn", OPEN_LIMIT_S, splits, judged="drawn")
        browser.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1, help="the baseline's epochs (made once)")
    parser.add_argument("--limit", type=int, default=64, help="images per split for the baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ui_pages.md")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    started, load_before = time.perf_counter(), os.getloadavg()
    baseline, run = build_workspace(args)
    model = Path(baseline).resolve().relative_to(WORKSPACE.resolve())
    query = urllib.parse.urlencode({"model": str(model), "run": run, "format": "synthetic-steel"})
    process, url = start_server()
    try:
        rows = measure(url, query, args.repeats)
    finally:
        os.killpg(process.pid, 9)
        subprocess.run(["pkill", "-9", "-f", f"{WORKSPACE}"], check=False)
    load_after = os.getloadavg()

    command = "python bench/ui_pages.py " + shlex.join(sys.argv[1:])
    lines = ["# The dashboard's pages in a browser: answer times", "", f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (load average {load_before[0]:.1f} at the "
             f"start, {load_after[0]:.1f} at the end: above 1, other work shared the CPU), Chromium headless, "
             f"server on the same machine. Wall time {time.perf_counter() - started:.0f} s.", "",
             f"Model: the workspace's baseline `{model}` (Unet-resnet18 on synthetic-steel, {args.epochs} epoch(s), "
             f"{args.limit} images per split) and its prune run {run}.", "",
             "Answer: from the action to the server's 'script finished' message in the browser. Drawn: until the "
             "page shows it (for the Compare rows that say so: until the comparison or cost it finishes in the "
             "server's background thread is on screen). Server: the server's own answer to the run the action "
             "asked for, from the request arriving to its 'script finished' leaving (bench/traced_server.py): "
             "answer less what the browser, sharing the two cores, adds. Each row is held to its limit by the "
             "time in bold: the slider and allocator targets are set on the server. Median (max) over the repeats.",
             "", "| case | limit | answer s | drawn s | server s | within the limit |", "|---|---|---|---|---|---|"]

    def cell(values: list[float], bold: bool) -> str:
        if not values:
            return "-"
        text = f"{statistics.median(values):.2f} ({max(values):.2f})"
        return f"**{text}**" if bold else text

    for r in rows:
        times = {"answer": r["answer_s"], "drawn": r["drawn_s"], "server": r["server_s"]}
        judged = times[r["judged"]]
        ok = "-" if r["limit_s"] is None or not judged else "yes" if max(judged) <= r["limit_s"] else "no"
        limit = "-" if r["limit_s"] is None else f"{r['limit_s']:g} s"
        lines.append(f"| {r['case']} | {limit} | " + " | ".join(
            cell(values, r["limit_s"] is not None and name == r["judged"]) for name, values in times.items())
            + f" | {ok} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(json.dumps({"written": str(args.out), "rows": rows}))


if __name__ == "__main__":
    main()
