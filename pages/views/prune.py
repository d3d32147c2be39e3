"""Prune: launch iterative prune-retrain rounds in the background, follow them round by round
against the tolerance band, stop and resume them, and compare runs on one frontier."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core.pruning.methods import METHODS
from core.runs import api
from core.pruning.loop import RunBase
from core.runs.api import PruneRunState
from core.runs.store import JobRecord
from core.services.compare import amount
from core.services.prune import PruneRequest
from core.services.request import ParameterError, choices_of, default_of
from ui.jobs import POLL_SECONDS, follow_job, job_bar
from ui.state import (DatasetChoice, JobIdError, current_dataset, error_box, job_request, query_job_id,
                      require_model, set_dataset)
from ui.widgets import load_style, precision_select

load_style()
st.title("Prune")
st.caption("Iterative prune-retrain: each round allocates per-layer amounts, cuts filters for real, fine-tunes "
           "and checks the validation defect mIoU against the tolerance.")

ROUND_COLUMNS = ["round", "accepted", "macs", "params", "macs_reduction", "params_reduction", "defect_miou", "drop",
                 "latency_ms", "checkpoint", "precision", "distillation"]
RECOVERY_COLOUR = "#f4a261"
# the launch form's defaults are the request's (one place: core/services/prune.py)
PRUNE_FIELDS = {field.name: field for field in dataclasses.fields(PruneRequest)}
PRUNE_DEFAULTS = {name: default_of(field) for name, field in PRUNE_FIELDS.items()}
# what a run budgets, in the form's words: each maps onto one of the request's exclusive
# targets (target_macs, target_params, target_latency) and its cost model (cost)
BUDGETS = {"macs": "fewer MACs (%)", "params": "fewer parameters (%)", "latency": "lower latency (%)",
           "latency_ms": "target latency (ms)"}
BUDGET_SLIDER_LABELS = {"macs": "Target: fewer MACs", "params": "Target: fewer parameters",
                        "latency": "Target: lower latency"}
LATENCY_ENGINE_LABELS = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime"}
LATENCY_CAPTION = ("The first run with a latency budget measures this machine's latency table for the model "
                   "(each layer timed over a grid of channel counts, per engine and thread count: seconds to a "
                   "minute); later runs reuse it.")


def default_budget() -> str:
    """The budget the request's defaults stand for (fewer MACs, 80%)."""
    if PRUNE_DEFAULTS["target_latency"] is not None:
        return "latency_ms"
    if PRUNE_DEFAULTS["target_params"] is not None:
        return "params"
    return "latency" if PRUNE_DEFAULTS["cost"] == "latency" else "macs"


class BudgetError(ParameterError):
    """A budget on the form the request cannot take (a target latency left blank)."""


def budget_fields(budget: str, target: float | None, target_ms: float | None, engine: str,
                  threads: int) -> dict:
    """The request fields of the form's budget: one exclusive target, its cost model and,
    for a latency budget, the latency table's engine and threads (the request checks the
    values themselves: a target of 0 ms is its one-line error)."""
    if budget == "macs":
        return {"target_macs": float(target), "cost": "macs"}
    if budget == "params":
        return {"target_params": float(target), "cost": "macs"}
    latency = {"cost": "latency", "latency_engine": engine, "latency_threads": int(threads)}
    if budget == "latency":
        return {"target_macs": float(target), **latency}
    if target_ms is None:
        raise BudgetError("type the target latency in ms (what this machine's latency table should predict for "
                          "the pruned model)")
    return {"target_latency": float(target_ms), **latency}


def _distillation(weight) -> str:
    return f"on (weight {weight:g})" if weight else "off"


def run_rounds(job_id: int) -> tuple[pd.DataFrame, PruneRunState, dict | None]:
    """A run's finished rounds, the run as the store holds it (``base``: what its starting
    checkpoint measured before round 1, None until then; ``result`` once it ended) and its
    recovery phase's record (None when none ran, or of an earlier last round)."""
    run = api.prune_run(job_id)
    # rounds recorded before precision was kept have "" there: shown as unknown, not as fp32
    rows = [{**dataclasses.asdict(r), "precision": r.precision or "-",
             "distillation": _distillation(r.distill_weight or 0.0)}
            for r in run.rounds]
    frame = pd.DataFrame(rows, columns=ROUND_COLUMNS)
    frame["MACs (M)"] = frame["macs"] / 1e6
    recovery = run.recovery
    kept = run.kept
    if recovery and (not kept or recovery.get("from_round") != kept[-1].round):
        recovery = None  # of an earlier last round (a resumed run goes on): it is redone at the end
    return frame, run, recovery


def settings_line(request: PruneRequest) -> str:
    """The run's own settings, in words: what it was launched with (not the form's values now)."""
    if request.target_params is not None:
        target = f"target {request.target_params:.0%} fewer parameters"
    elif request.target_latency is not None:
        target = f"target latency {request.target_latency:g} ms"
    else:  # with --cost latency a reduction target reads as a latency reduction
        target = f"target {request.target_macs:.0%} " + ("lower latency" if request.cost == "latency" else "fewer MACs")
    parts = [f"method {request.method}", target,
             f"tolerance {request.tolerance:g} points", f"step {request.step:.0%}",
             f"{request.finetune_epochs} fine-tune epoch(s) per round", f"at most {request.max_rounds} rounds"]
    if request.distill_weight:
        parts.append(f"distillation {request.distill_weight:g} (T {request.distill_temperature:g})")
    if request.recover_epochs:
        rate = "the fine-tune rate" if request.recover_lr is None else f"lr {request.recover_lr:g}"
        parts.append(f"recovery {request.recover_epochs} epoch(s) ({rate})")
    if request.allocation:
        parts.append("round 1 cut to a fixed allocation")
    return "Settings: " + ", ".join(parts) + "."


def draw_result(result: dict | None) -> None:
    """A finished run's result on the test split (touched once, on the result)."""
    if not result:
        return
    test = result.get("test")
    if test and test.get("defect_miou") is not None:
        base = result.get("base_val_defect_miou")
        st.metric("Test defect mIoU of the result", f"{test['defect_miou']:.1f}",
                  help="The test split, evaluated once on the run's result checkpoint. "
                       + ("" if base is None else f"The unpruned model's validation defect mIoU was {base:.1f}."))
    elif result.get("test_skipped"):
        st.caption(f"Test split: not evaluated ({result['test_skipped']}).")
    elif result.get("checkpoint") is None:
        st.caption("No round was kept: the unpruned model is the result.")


def round_chart(frame: pd.DataFrame, base: RunBase | None, tolerance: float, recovery: dict | None = None) -> go.Figure:
    """The run's rounds from round 0 (its starting checkpoint) with the tolerance band under
    that checkpoint's val defect mIoU: the drop each round is judged by; and the recovery
    phase's result beside the round it started from (same MACs, more epochs)."""
    base_miou = base.defect_miou if base else None
    if base and base.macs and len(frame):
        start = {"round": 0, "accepted": True, "defect_miou": base_miou, "MACs (M)": base.macs / 1e6}
        frame = pd.concat([pd.DataFrame([start]), frame], ignore_index=True)
    figure = go.Figure()
    if base_miou is not None:
        figure.add_hrect(y0=base_miou - tolerance, y1=base_miou, fillcolor="#2a9d8f", opacity=0.15, line_width=0,
                         annotation_text=f"tolerance ({tolerance:g} points)")
        figure.add_hline(y=base_miou, line_dash="dot", annotation_text="unpruned")
    colours = ["#2a9d8f" if ok else "#e63946" for ok in frame["accepted"]]
    figure.add_trace(go.Scatter(x=frame["MACs (M)"], y=frame["defect_miou"], mode="lines+markers+text",
                                text=[f"r{r}" for r in frame["round"]], textposition="top center",
                                marker={"color": colours, "size": 10}, name="rounds"))
    if recovery:
        start = frame[frame["round"] == recovery["from_round"]]
        xs = [recovery["macs"] / 1e6]
        ys = [recovery["defect_miou"]]
        if len(start):  # a dotted step from the round it fine-tuned further
            xs.insert(0, float(start["MACs (M)"].iloc[0]))
            ys.insert(0, start["defect_miou"].iloc[0])
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers+text", name="recovery",
                                    text=[""] * (len(xs) - 1) + [f"recovery ({recovery['epochs']} epochs)"],
                                    textposition="middle left", line={"dash": "dot", "color": RECOVERY_COLOUR},
                                    marker={"symbol": ["circle"] * (len(xs) - 1) + ["star"], "size": 14,
                                            "color": RECOVERY_COLOUR}))
    figure.update_layout(title="Validation defect mIoU against MACs, round by round",
                         xaxis_title="MACs (millions)", yaxis_title="val defect mIoU (%)", xaxis_autorange="reversed")
    return figure


def compare_run(job: JobRecord, request: PruneRequest) -> None:
    """Open Compare on this run: the workspace becomes the run's (its dataset, its starting
    checkpoint as the model, the run), and Compare preselects the run's starting model as
    before and its result (or last kept round) as after (``compare_run`` asks it to, over
    what was chosen there earlier)."""
    if request.format:
        set_dataset(DatasetChoice(format=request.format, root=request.root, seed=int(request.split_seed or 0),
                                  options=json.dumps(request.option) if request.option else ""))
    if Path(request.checkpoint).is_dir():  # a starting checkpoint deleted since is not made the model
        st.session_state["model"] = request.checkpoint
    st.session_state["run"] = job.id
    st.session_state["compare_run"] = job.id
    st.switch_page("pages/views/compare.py", query_params={"run": str(job.id)})


def draw_run(job: JobRecord) -> None:
    request = job_request(job)
    job_bar(job, f"Prune run ({request.method})")
    st.caption(settings_line(request))
    frame, run, recovery = run_rounds(job.id)
    c1, c2, c3 = st.columns(3)
    kept = run.best_kept()[0] is not None
    if c3.button("Compare this run", key=f"compare_run_{job.id}", disabled=not kept,
                 help="Compare, with this run's starting model as before and its result (or last kept round) as "
                      "after" if kept else "No kept round yet: nothing to compare with the starting model."):
        compare_run(job, request)
    if job.stop_requested and not job.finished:
        st.caption("Stop requested: the run stops within seconds and keeps its finished rounds.")
    elif not job.finished and c1.button("Stop", key=f"stop_{job.id}"):
        api.stop(job.id)
        st.rerun()
    if job.state in ("failed", "stopped") and c2.button("Resume from the last finished round", key=f"resume_{job.id}"):
        api.resume(job.id)
        api.ensure_worker()
        st.rerun()  # the page follows it again
    if job.state == "failed":
        st.error(f"The run failed: {job.error}")
    if job.finished:
        draw_result(run.result)
    if frame.empty:
        st.caption("No round finished yet.")
        return
    st.plotly_chart(round_chart(frame, run.base, request.tolerance, recovery), width="stretch",
                    key=f"rounds_{job.id}")
    st.dataframe(round_table(frame), hide_index=True)
    if recovery:
        draw_recovery(frame, recovery)


def round_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The rounds as people read them: plain column names, reductions in percent, IoU with one
    decimal, MACs in M or G."""
    return pd.DataFrame({
        "round": frame["round"], "kept": frame["accepted"].map({True: "yes", False: "no (reverted)"}),
        "MACs": frame["macs"].map(amount), "fewer MACs": frame["macs_reduction"].map("{:.1%}".format),
        "parameters": frame["params"].map(amount), "fewer parameters": frame["params_reduction"].map("{:.1%}".format),
        "val defect mIoU": frame["defect_miou"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.1f}"),
        "drop (points)": frame["drop"].map(lambda v: "n/a" if pd.isna(v) else f"{v:+.1f}"),
        "latency (ms, torch)": frame["latency_ms"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.1f}"),
        "precision": frame["precision"], "distillation": frame["distillation"],
    })


def draw_recovery(frame: pd.DataFrame, recovery: dict) -> None:
    """The recovery phase: val defect mIoU before (its starting round) and after, and its settings."""
    st.markdown(f"#### Recovery of round {recovery['from_round']}")
    start = frame[frame["round"] == recovery["from_round"]]
    before = start["defect_miou"].iloc[0] if len(start) else None
    before = None if before is None or pd.isna(before) else float(before)
    after = recovery.get("defect_miou")
    c1, c2, c3 = st.columns(3)
    c1.metric("Val defect mIoU before recovery", "n/a" if before is None else f"{before:.2f}")
    c2.metric("Val defect mIoU after recovery", "n/a" if after is None else f"{after:.2f}",
              None if before is None or after is None else f"{after - before:+.2f}")
    c3.metric("Drop against the unpruned model", "n/a" if recovery.get("drop") is None else f"{recovery['drop']:.2f}")
    settings = {"epochs": recovery.get("epochs"), "best epoch": recovery.get("best_epoch"),
                "learning rate": recovery.get("lr"), "warm-up share": recovery.get("warmup"),
                "distillation": _distillation(recovery.get("distill_weight") or 0.0),
                "temperature": recovery.get("distill_temperature"), "precision": recovery.get("precision"),
                "MACs reduction": recovery.get("macs_reduction"), "latency (ms)": recovery.get("latency_ms"),
                "time (s)": recovery.get("wall_s"), "checkpoint": recovery.get("checkpoint")}
    shown = [f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v) for v in settings.values()]
    st.dataframe(pd.DataFrame({"setting": list(settings), "value": shown}), hide_index=True)
    st.caption("The recovered checkpoint is the run's result; the Compare page lists it as .../recovered.")


# ---------------------------------------------------------------- all runs on one frontier
PALETTE = px.colors.qualitative.Plotly
LATENCY_AXIS = "torch latency (ms, CPU, batch 1, 1 thread)"


def run_name(run: JobRecord) -> str:
    return f"#{run.id} {job_request(run).method}"


def _rounds_word(count: int) -> str:
    return f"{count} round" if count == 1 else f"{count} rounds"


def frontier_points(runs: list[JobRecord]) -> tuple[pd.DataFrame, dict[str, RunBase | None], list[str], int]:
    """Every run's kept rounds, each run's line starting at its starting checkpoint (round 0):
    the points (run, round, MACs reduction, latency in ms where the round recorded one, val
    defect mIoU), each drawn run's base measurement by name, the runs with finished rounds and
    none kept (in words), and how many rounds finished in all."""
    points, bases, unkept, finished = [], {}, [], 0
    for run in sorted(runs, key=lambda r: r.id):
        frame, state, _recovery = run_rounds(run.id)
        finished += len(frame)
        if frame.empty:
            continue
        kept = state.kept
        if not kept:  # a lone starting point says nothing: the run is named instead
            unkept.append(f"#{run.id} finished {_rounds_word(len(frame))}, none within its tolerance of "
                          f"{job_request(run).tolerance:g} points")
            continue
        name, base = run_name(run), state.base
        bases[name] = base
        if base and base.macs:
            points.append({"run": name, "round": 0, "MACs reduction": 0.0, "latency (ms)": base.latency_ms,
                           "val defect mIoU": base.defect_miou})
        points += [{"run": name, "round": r.round, "MACs reduction": r.macs_reduction,
                    "latency (ms)": None if pd.isna(r.latency_ms) else r.latency_ms,
                    "val defect mIoU": r.defect_miou} for r in kept]
    columns = ["run", "round", "MACs reduction", "latency (ms)", "val defect mIoU"]
    return pd.DataFrame(points, columns=columns), bases, unkept, finished


def run_colours(runs: list[JobRecord]) -> dict[str, str]:
    """One colour per run, the same on both charts; by age, so a new run leaves the others' alone."""
    return {run_name(run): PALETTE[i % len(PALETTE)] for i, run in enumerate(sorted(runs, key=lambda r: r.id))}


def macs_frontier(points: pd.DataFrame, colours: dict[str, str]) -> go.Figure:
    figure = px.line(points, x="MACs reduction", y="val defect mIoU", color="run", markers=True,
                     color_discrete_map=colours, hover_data=["round"], title="Accuracy against cost, one line per run")
    figure.update_layout(xaxis_title="fewer MACs than the run's start", xaxis_tickformat=".0%",
                         yaxis_title="val defect mIoU (%)")
    return figure


def latency_frontier(points: pd.DataFrame, bases: dict[str, RunBase | None], colours: dict[str, str]) -> go.Figure:
    """Val defect mIoU against the latency each kept round measured when it finished (faster to
    the right, as pruning goes). A run's start is its line's first point where its latency was
    recorded, else a dotted line at its val defect mIoU (the unpruned reference), one per start."""
    timed = points.dropna(subset=["latency (ms)"])
    figure = px.line(timed, x="latency (ms)", y="val defect mIoU", color="run", markers=True,
                     color_discrete_map=colours, hover_data=["round"],
                     title="Accuracy against latency, one line per run")
    starts: dict[float, list[str]] = {}
    for name, base in bases.items():
        if base and base.latency_ms is None and base.defect_miou is not None and name in set(timed["run"]):
            starts.setdefault(round(float(base.defect_miou), 6), []).append(name)
    for miou, names in starts.items():
        figure.add_hline(y=miou, line_dash="dot", line_color=colours.get(names[0]) if len(names) == 1 else "grey",
                         annotation_text=f"start of {', '.join(n.split()[0] for n in names)} (latency not recorded)",
                         annotation_position="bottom left")
    figure.update_layout(xaxis_title=LATENCY_AXIS, yaxis_title="val defect mIoU (%)", xaxis_autorange="reversed")
    return figure


def draw_frontiers(was_active: bool) -> None:
    """Both frontiers from one fresh read of the store. The error box is in here: the timed
    reruns run this function alone. When a run starts or ends, the whole page reruns, so the
    refresh starts or stops with it."""
    with error_box("Reading the runs"):
        runs = api.list_jobs(kind="prune")
        active = any(not run.finished for run in runs)
        if active != was_active:
            st.rerun()
        points, bases, unkept, finished = frontier_points(runs)
        refresh = " (this refreshes every 2 s while a run is going)." if active else "."
        if not runs:
            st.info("No run yet: launch one above; each run's kept rounds appear here as they finish.")
            return
        if points.empty:
            if unkept:
                st.info("No kept round yet: " + "; ".join(unkept) + ". Rounds that broke the tolerance are not on "
                        "the frontier: a smaller step or a wider tolerance keeps more" + refresh)
            else:
                st.info("No round finished yet: each run's kept rounds appear here as they finish" + refresh)
            return
        colours = run_colours(runs)
        left, right = st.columns(2)
        left.plotly_chart(macs_frontier(points, colours), width="stretch", key="frontier_macs")
        if points["latency (ms)"].notna().any():
            right.plotly_chart(latency_frontier(points, bases, colours), width="stretch", key="frontier_latency")
            right.caption("Latency as each round measured it when it finished: PyTorch on the CPU, batch 1, one "
                          "thread, median of 10 runs, at whatever load the machine had then (Compare times two "
                          "models together, in turns).")
        else:
            right.info("No latency recorded: these runs' kept rounds carry no latency, so only the MACs are drawn.")
        if unkept:
            st.caption("Not on the frontier (no kept round): " + "; ".join(unkept) + ".")


loaded = require_model("No model yet: train or load one on the Model page, then come back to prune it.", stop=False)
if loaded is not None:
    # outside the form: the form's target widget (and the latency table's settings) follow it at once
    budget = st.radio("Budget", list(BUDGETS), index=list(BUDGETS).index(default_budget()), format_func=BUDGETS.get,
                      horizontal=True, key="prune_budget",
                      help="What the run prunes towards: a MACs or parameter reduction (the closed-form cost "
                           "model), or a latency reduction or a latency in ms as this machine's latency table "
                           "predicts it.")
    with st.form("prune_form"):
        c1, c2, c3 = st.columns(3)
        method = c1.selectbox("Method", list(METHODS), index=list(METHODS).index(PRUNE_DEFAULTS["method"]),
                              format_func=lambda m: f"{m}: {METHODS[m].description}", key="prune_method")
        target, target_ms = None, None
        if budget == "latency_ms":
            target_ms = c2.number_input("Target latency (ms)", value=PRUNE_DEFAULTS["target_latency"], step=0.5,
                                        placeholder="e.g. 5.0", key="prune_target_latency",
                                        help="The pruned model's latency on this machine, batch 1, as its latency "
                                             "table predicts it (the Layer importance page shows the prediction).")
        else:  # a reduction; the parameter target has no default of its own: the MACs one starts the slider
            start = PRUNE_DEFAULTS["target_params"] if budget == "params" else None
            target = c2.slider(BUDGET_SLIDER_LABELS[budget], 0.1, 0.95,
                               PRUNE_DEFAULTS["target_macs"] if start is None else start, 0.05, key="prune_target")
        tolerance = c3.number_input("Tolerance (defect-mIoU points)", 0.0, 50.0, PRUNE_DEFAULTS["tolerance"], 0.5,
                                    key="prune_tolerance")
        c4, c5, c6 = st.columns(3)
        # under a latency budget a round cuts its share of the predicted ms (core.pruning.loop)
        cut = "predicted latency" if budget in ("latency", "latency_ms") else "MACs"
        step = c4.slider(f"Step: share of the remaining {cut} cut per round", 0.1, 0.9, PRUNE_DEFAULTS["step"], 0.05,
                         key="prune_step")
        epochs = c5.number_input("Fine-tune epochs per round", 0, 50, PRUNE_DEFAULTS["finetune_epochs"],
                                 key="prune_epochs")
        rounds = c6.number_input("Round limit", 1, 30, PRUNE_DEFAULTS["max_rounds"], key="prune_rounds")
        c7, c8, c9, c10, c11 = st.columns(5)
        recover_epochs = c7.number_input(
            "Recovery epochs", 0, 200, PRUNE_DEFAULTS["recover_epochs"], key="prune_recover_epochs",
            help="After the last round, fine-tune the last kept round this many more epochs (warm-up, then a "
                 "cosine-decaying rate); the recovered checkpoint becomes the result. 0: no recovery phase.")
        recover_lr = c8.number_input("Recovery learning rate", min_value=1e-6, max_value=1.0,
                                     value=PRUNE_DEFAULTS["recover_lr"],
                                     step=1e-4, format="%.6f", placeholder="the fine-tune rate",
                                     key="prune_recover_lr", help="Blank: the rounds' fine-tune rate.")
        distill_weight = c9.slider(
            "Distillation weight", 0.0, 1.0, PRUNE_DEFAULTS["distill_weight"], 0.05, key="prune_distill_weight",
            help="Every fine-tune also learns the starting model's outputs: loss = (1 - weight) x supervised "
                 "+ weight x T^2 x KL. 0: off.")
        temperature = c10.number_input("Distillation temperature T", 0.5, 20.0, PRUNE_DEFAULTS["distill_temperature"],
                                       0.5, key="prune_distill_temperature")
        precision = precision_select(c11, PruneRequest, key="prune_precision")
        engine, threads = PRUNE_DEFAULTS["latency_engine"], PRUNE_DEFAULTS["latency_threads"]
        if budget in ("latency", "latency_ms"):
            c12, c13 = st.columns([2, 1])
            engines = choices_of(PRUNE_FIELDS["latency_engine"])
            engine = c12.radio("Latency engine", engines, index=engines.index(engine), horizontal=True,
                               format_func=lambda e: LATENCY_ENGINE_LABELS.get(e, e), key="prune_latency_engine",
                               help="The engine the pruned model will run on: the latency table times its layers "
                                    "there.")
            threads = c13.number_input("Latency threads", 1, 256, threads, key="prune_latency_threads",
                                       help="CPU threads the model will run with on the device.")
            st.caption(LATENCY_CAPTION)
        launch = st.form_submit_button("Launch in the background")
    if launch:
        with error_box("Launching the run"):
            choice = current_dataset()
            # options only for the model's own format: the job takes that dataset from the store
            options = choice.parsed_options() if loaded.spec.dataset_format == choice.format and choice.options else {}
            request = PruneRequest(
                checkpoint=st.session_state["model"], method=method,
                **budget_fields(budget, target, target_ms, engine, threads),
                tolerance=float(tolerance), step=float(step), finetune_epochs=int(epochs), max_rounds=int(rounds),
                recover_epochs=int(recover_epochs), distill_weight=float(distill_weight),
                distill_temperature=float(temperature), precision=precision, option=options,
                recover_lr=None if recover_lr is None else float(recover_lr))  # None: the fine-tune rate
            job = api.submit("prune", request)
            api.ensure_worker()
            st.session_state["run"] = job.id
            st.query_params["run"] = str(job.id)
            st.rerun()  # the sidebar names the new run

with error_box("Reading the run"):
    run_id = st.session_state.get("run") or query_job_id("run")
    if run_id:
        job = api.get_job(int(run_id))
        if job.kind != "prune":
            raise JobIdError(f"job {job.id} is a {job.kind} job, not a prune run; launch a run above or open "
                             "one from the runs below")
        follow_job(job, f"Following run {job.id}", draw_run)

st.markdown("#### All runs on one frontier")
runs: list[JobRecord] = []
with error_box("Reading the runs"):
    runs = api.list_jobs(kind="prune")
# Drawn in a fragment that rereads the store every two seconds while any run is unfinished (the
# panel above follows one run in its own fragment; drawn outside, this section kept whatever the
# last full rerun had read, e.g. "no kept round yet" beside a kept round 1).
active = any(not run.finished for run in runs)
st.fragment(draw_frontiers, run_every=POLL_SECONDS if active else None)(active)
if runs:
    # no state in the label: a keyed selectbox can keep showing the label it was first drawn with
    labels = {run.id: f"#{run.id} {job_request(run).method}, launched "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(run.created_at))}" for run in runs}
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    opened = c1.selectbox("Open a run", list(labels), format_func=labels.get, key="prune_open")
    if c2.button("Open", key="prune_open_run"):
        st.session_state["run"] = opened
        st.query_params["run"] = str(opened)
        st.rerun()
