"""Prune: launch iterative prune-retrain rounds in the background, follow them round by round
against the tolerance band, stop and resume them, and compare runs on one frontier."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core.pruning.methods import METHODS
from core.runs import api
from ui.state import JobIdError, current_dataset, error_box, query_job_id, require_model
from ui.widgets import load_style

load_style()
st.title("Prune")
st.caption("Iterative prune-retrain: each round allocates per-layer amounts, cuts filters for real, fine-tunes "
           "and checks the validation defect mIoU against the tolerance.")

loaded = require_model("No model yet: train or load one on the Model page, then come back to prune it.")
base_checkpoint = st.session_state["model"]


def rounds_frame(job_id: int) -> pd.DataFrame:
    rounds = api.prune_rounds(job_id)
    frame = pd.DataFrame(rounds, columns=["round", "accepted", "macs", "params", "macs_reduction",
                                          "params_reduction", "defect_miou", "drop", "latency_ms", "checkpoint"])
    frame["MACs (M)"] = frame["macs"] / 1e6
    return frame


def round_chart(frame: pd.DataFrame, base_miou: float | None, tolerance: float) -> go.Figure:
    if base_miou is not None and len(frame):
        # round 0 is the unpruned model, so each line starts where the run started
        first = frame.iloc[0]
        start = {"round": 0, "accepted": True, "defect_miou": base_miou,
                 "MACs (M)": first["MACs (M)"] / max(1e-9, 1.0 - first["macs_reduction"])}
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
    figure.update_layout(title="Validation defect mIoU against MACs, round by round",
                         xaxis_title="MACs (millions)", yaxis_title="val defect mIoU (%)", xaxis_autorange="reversed")
    return figure


@st.fragment(run_every=2.0)
def run_progress(job_id: int) -> None:
    job = api.get_job(job_id)
    st.progress(min(max(job.progress, 0.0), 1.0), text=f"Job {job.id} ({job.state}): {job.message}")
    c1, c2 = st.columns(2)
    if job.state in ("queued", "running") and c1.button("Stop", key=f"stop_{job.id}"):
        api.stop(job.id)
    if job.state in ("failed", "stopped") and c2.button("Resume from the last finished round", key=f"resume_{job.id}"):
        api.resume(job.id)
        api.ensure_worker()
    if job.state == "failed":
        st.error(f"The run failed: {job.error}")
    frame = rounds_frame(job_id)
    if frame.empty:
        st.caption("No round finished yet.")
        return
    base = (loaded.spec.metrics or {}).get("defect_miou")
    st.plotly_chart(round_chart(frame, base, float(job.params.get("tolerance", 1.0))), width="stretch",
                    key=f"rounds_{job.id}")
    st.dataframe(frame[["round", "accepted", "macs_reduction", "params_reduction", "defect_miou", "drop",
                        "latency_ms"]], hide_index=True)


with st.form("prune_form"):
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Method", list(METHODS), format_func=lambda m: f"{m}: {METHODS[m].description}",
                          key="prune_method")
    target = c2.slider("Target: fewer MACs", 0.1, 0.95, 0.8, 0.05, key="prune_target")
    tolerance = c3.number_input("Tolerance (defect-mIoU points)", 0.0, 50.0, 1.0, 0.5, key="prune_tolerance")
    c4, c5, c6 = st.columns(3)
    step = c4.slider("Step: share of the remaining MACs cut per round", 0.1, 0.9, 0.3, 0.05, key="prune_step")
    epochs = c5.number_input("Fine-tune epochs per round", 0, 50, 2, key="prune_epochs")
    rounds = c6.number_input("Round limit", 1, 30, 10, key="prune_rounds")
    launch = st.form_submit_button("Launch in the background")
if launch:
    with error_box("Launching the run"):
        choice = current_dataset()
        params = {"checkpoint": base_checkpoint, "method": method, "target_macs": float(target),
                  "tolerance": float(tolerance), "step": float(step), "finetune_epochs": int(epochs),
                  "max_rounds": int(rounds)}
        if loaded.spec.dataset_format == choice.format and choice.options:
            params["option"] = choice.parsed_options()
        job = api.submit("prune", params)
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
                             "one from the frontier below")
        run_progress(job.id)

st.markdown("#### All runs on one frontier")
points = []
with error_box("Reading the runs"):
    for job in api.list_jobs(kind="prune"):
        for r in api.prune_rounds(job.id):
            if r["accepted"]:
                points.append({"run": f"#{job.id} {job.params.get('method')}", "MACs reduction": r["macs_reduction"],
                               "val defect mIoU": r["defect_miou"], "round": r["round"]})
if points:
    st.plotly_chart(px.line(pd.DataFrame(points), x="MACs reduction", y="val defect mIoU", color="run",
                            markers=True, title="Accuracy against cost, one line per run"), width="stretch")
else:
    st.info("Launch a run above; its rounds appear here as they finish.")
