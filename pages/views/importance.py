"""Layer importance: what the scoring network thinks of each layer and scale, and live tuning
of the pruning ratios (allocation, MACs, parameters and size answer from the closed-form cost
model without pruning anything). Allocators that need measurements (the scoring network's
logits, the sensitivity curves) take them from a score job run once in the background."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.atomic import write_json_atomic
from core.config import workspace_dir
from core.data.dataset import SegmentationDataset
from core.live import (
    allocator_labels, allocator_needs, cached_latency_model, group_l1_scores, live_allocation, measure_latency_model,
    preview_pruned,
)
from core.pruning.methods import METHODS
from core.pruning.step import FixedAllocation
from core.runs import api
from core.runs.store import JobRecord
from core.services.compare import amount
from core.services.prune import PruneRequest
from core.services.request import ParameterError
from core.services.score import ScoreRequest, ScoreResult
from ui.jobs import follow_job, job_bar
from ui.state import (
    current_cost_model, current_dataset, dataset_index, error_box, job_request, query_job_id, require_model,
    score_result, weights_mtime,
)
from ui.widgets import image_grid, layer_bars, layer_table, load_style

load_style()
st.title("Layer importance")
st.caption("Importance per layer and per scale from the scoring network, and live pruning-ratio tuning.")

loaded = require_model()
checkpoint = st.session_state["model"]
graph, cost = current_cost_model()
groups = layer_table(graph)

@dataclass(frozen=True)
class ScoreJob:
    """A score job this page starts: where its id is kept (session and address keys), the
    method and allocator it runs, and what the user reads about it."""

    session_key: str
    address_key: str
    method: str
    allocator: str | None
    what: str

    def request(self) -> ScoreRequest:
        return ScoreRequest(checkpoint=checkpoint, method=self.method, allocator=self.allocator, target=0.8)


SCORING = ScoreJob("score_job", "score", "collaborative", None, "The scoring network")
SENSITIVITY = ScoreJob("sensitivity_job", "sensitivity", "uniform-l1", "sensitivity", "Measuring the sensitivity curves")


LATENCY_ENGINES = {"PyTorch": "torch", "ONNX Runtime": "onnxruntime"}


@st.cache_resource(show_spinner=False, max_entries=4)
def latency_model(path: str, mtime: float, engine: str, threads: int, table_mtime: float):
    """This model's latency cost model from the machine's cached table, or None (nothing is
    measured here: a page run stays fast); the table file's time renews it once measured."""
    return cached_latency_model(graph, engine, threads)


def latency_table_mtime(engine: str, threads: int) -> float:
    from core.allocation.latency import LatencySettings

    path = LatencySettings(engine=engine, threads=threads).path()
    return path.stat().st_mtime if path.is_file() else 0.0


@st.cache_data(show_spinner=False)
def l1_scores(path: str, mtime: float) -> dict[str, np.ndarray]:
    return group_l1_scores(graph)


# The global allocator's channel scores, with the page's first open of this model (a fifth of
# a second on a CPU, cached afterwards): choosing that allocator then answers at once.
l1_scores(checkpoint, weights_mtime(checkpoint))


def followed_job(kind: ScoreJob) -> JobRecord | None:
    """The newest job of ``kind`` for this model among the one started here, the one in the
    address (a refreshed or reopened tab) and the recent ones in the run store."""
    resolved = str(Path(checkpoint).resolve())

    def ours(job: JobRecord) -> bool:
        if job.kind != "score":
            return False
        try:
            request = job_request(job)
        except ParameterError:  # parameters this version no longer reads: not a job to draw
            return False
        return request.checkpoint == resolved and request.allocator == kind.allocator

    named = [api.get_job(int(i)) for i in (st.session_state.get(kind.session_key), query_job_id(kind.address_key))
             if i is not None]
    found = [job for job in named + api.list_jobs(kind="score", limit=50) if ours(job)]
    return max(found, key=lambda job: job.id, default=None)


def start_job(kind: ScoreJob) -> None:
    job = api.submit("score", kind.request())
    api.ensure_worker()
    st.session_state[kind.session_key] = job.id
    st.query_params[kind.address_key] = str(job.id)
    st.rerun()


def job_status(job: JobRecord | None, kind: ScoreJob) -> ScoreResult | None:
    """The job's result when it succeeded; otherwise its progress or failure, and None."""
    if job is None:
        return None
    if job.state == "failed":
        st.error(f"{kind.what} failed (job {job.id}): {job.error}")
    elif job.state == "stopped":
        st.warning(f"{kind.what} was stopped (job {job.id}); start it again.")
    elif not job.finished:
        # once it is final the whole page reruns and draws the results (or the failure)
        follow_job(job, f"Following job {job.id}", lambda latest: job_bar(latest, kind.what, stoppable=True))
    else:
        return score_result(job)
    return None


def draw_scores(scores: ScoreResult, target: float) -> None:
    """The scoring network's keep ratio per layer and per scale at the slider's target (its
    logits answer any target), and the layer x class importance."""
    importance = scores.allocation
    if scores.logits is not None:  # a job scored at 80%: its logits answer the slider's target
        importance = live_allocation("scoring-network", graph, cost, target, logits=scores.logits).to_dict()
    frame = groups.assign(importance=[importance["group_importance"][g] for g in groups["group"]])
    st.plotly_chart(layer_bars(frame, "importance", pattern_shape="role",
                               title=f"Importance per layer (keep ratio at {target:.0%} fewer MACs), network order"),
                    width="stretch")
    by_scale = importance["scale_importance"]
    c1, c2 = st.columns(2)
    # graph objects, not plotly express: these redraw on every slider move
    per_scale = go.Figure(go.Bar(x=[f"stride {s}" for s in by_scale], y=list(by_scale.values())))
    per_scale.update_layout(title=f"Importance per scale (MACs-weighted, at {target:.0%} fewer MACs)",
                            xaxis_title="scale", yaxis_title="importance")
    c1.plotly_chart(per_scale, width="stretch")
    if scores.class_importance:
        matrix = pd.DataFrame(scores.class_importance).T.loc[list(groups["group"])]
        heat = go.Figure(go.Heatmap(z=matrix.T.to_numpy(), x=list(matrix.index), y=list(matrix.columns),
                                    colorscale="RdBu", zmin=-1, zmax=1,
                                    hovertemplate="layer %{x}<br>%{y}: %{z:.2f}<extra></extra>"))
        # every layer named (plotly would skip labels to fit), in network order
        heat.update_layout(title="Layer x defect-class importance", xaxis_title="layer", yaxis_title="defect class",
                           yaxis_autorange="reversed")
        heat.update_xaxes(tickmode="array", tickvals=list(matrix.index), ticktext=list(matrix.index), tickangle=-60,
                          tickfont={"size": 9})
        c2.plotly_chart(heat, width="stretch")


def launch_with(allocation: FixedAllocation) -> None:
    """Write ``allocation`` into the workspace (named by its content: the same setting is one
    file), submit a prune run with it at its target, and open that run on the Prune page."""
    text = json.dumps(allocation.to_json(), sort_keys=True)
    path = write_json_atomic(workspace_dir() / "allocations" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json",
                             allocation.to_json())
    choice = current_dataset()
    # options only for the model's own format, as the Prune page: the job takes that dataset from the store
    options = choice.parsed_options() if loaded.spec.dataset_format == choice.format and choice.options else {}
    # The user chose this cut: its round is kept whatever its drop (shown on the Prune page)
    # instead of the tolerance throwing it away, which a one-round cut to 80% nearly always did
    request = PruneRequest(checkpoint=checkpoint, method=list(METHODS)[0], allocation=str(path),
                           target_macs=allocation.target, option=options, no_tolerance_stop=True)
    job = api.submit("prune", request)
    api.ensure_worker()
    st.session_state["run"] = job.id
    st.switch_page("pages/views/prune.py", query_params={"run": str(job.id)})


st.markdown("#### The scoring network")
score_job, scores = None, None
with error_box("Reading the scoring job"):
    score_job = followed_job(SCORING)
    scores = job_status(score_job, SCORING)
if (score_job is None or score_job.finished) and st.button("Run the scoring network (background job)",
                                                           key="importance_run"):
    with error_box("Starting the scoring network"):
        start_job(SCORING)
score_charts = st.container()  # drawn below, once the slider's target is read
if not scores:
    st.info("Run the scoring network to see which layers and scales matter for this dataset's defects "
            "(a few minutes on a CPU). Uniform and global allocations below work without it.")

@st.fragment
def live_tuning() -> None:
    """Everything a slider, allocator or override answers (the scoring network's charts above
    included, drawn into their container): a fragment, so a slider move reruns this alone, not
    the page's frame, job lookups and scoring section (the 300 ms a move may take)."""
    st.markdown("#### Live pruning-ratio tuning")
    c1, c2 = st.columns(2)
    # in percent as it reads; the allocators take the fraction
    target = c1.slider("Fewer MACs", 5, 95, 80, 5, format="%d%%", key="importance_target") / 100
    labels = allocator_labels()
    allocator = c2.radio("Allocator", list(labels), horizontal=True, key="importance_allocator")
    allocator_name = labels[allocator]

    if scores:
        with score_charts, error_box("Drawing the scoring network's importance"):
            draw_scores(scores, target)


    # Each stored result an allocator may need (core.allocation.context.NEEDS): how this page gets
    # it, as `live_allocation`'s keywords, or None after saying (once) how to get it.
    def stored_l1_scores() -> dict | None:
        return {"l1_scores": l1_scores(checkpoint, weights_mtime(checkpoint))}


    def stored_logits() -> dict | None:
        if scores and scores.logits is not None:
            return {"logits": scores.logits}
        st.info(f"The {allocator_name} allocation answers from a scoring job's results: run the scoring network "
                "above (a background job), then choose it here.")
        return None


    def stored_drops() -> dict | None:
        sensitivity_job, curves = None, None
        with error_box("Reading the sensitivity job"):
            sensitivity_job = followed_job(SENSITIVITY)
            measured = job_status(sensitivity_job, SENSITIVITY)
            curves = measured.sensitivity_curves if measured else None
        if curves:
            return {"drops": curves["drops"], **({"levels": curves["levels"]} if curves.get("levels") else {})}
        if sensitivity_job is None or sensitivity_job.finished:
            st.info("No sensitivity curves for this model yet. Sensitivity analysis prunes each layer alone at "
                    "30, 50, 70 and 90% and measures the loss on calibration images: too slow to redo for every "
                    "slider position, so it is measured once in the background (a few minutes on a CPU); "
                    "afterwards every target answers at once.")
            if st.button("Measure the sensitivity curves (background job)", key="importance_sensitivity_run"):
                with error_box("Starting the sensitivity measurement"):
                    start_job(SENSITIVITY)
        return None


    STORED = {"l1_scores": stored_l1_scores, "logits": stored_logits, "drops": stored_drops}

    # every need is asked for (one message for each that is missing); the allocation waits for all
    stored: dict | None = None
    with error_box("Reading what the allocator needs"):
        found = [STORED[need]() for need in allocator_needs(allocator_name)]
        if all(part is not None for part in found):
            stored = {key: value for part in found for key, value in part.items()}

    kept = None
    if stored is not None:
        with error_box("Allocating"):
            start = time.perf_counter()
            live = live_allocation(allocator_name, graph, cost, target, **stored)
            kept = dict(live.kept)
            with st.expander("Per-layer overrides"):
                st.caption("Type a channel count to keep for any layer; the totals follow at once.")
                table = groups.assign(kept=[kept[g] for g in groups["group"]])[["group", "scale", "channels", "kept"]]
                edited = st.data_editor(table, disabled=["group", "scale", "channels"], hide_index=True,
                                        key="importance_overrides")
                for name, channels, value in zip(edited["group"], edited["channels"], edited["kept"]):
                    if not pd.isna(value):  # an emptied cell: the allocator's count stands
                        kept[name] = int(min(max(int(value), 1), int(channels)))
            predicted = cost.predict(kept)
            engine_label = st.session_state.get("importance_latency_engine", "PyTorch")
            engine = LATENCY_ENGINES.get(engine_label, "torch")
            timed = latency_model(checkpoint, weights_mtime(checkpoint), engine, 1, latency_table_mtime(engine, 1))
            latency = timed.predict(kept) if timed is not None else None
            elapsed_ms = (time.perf_counter() - start) * 1000
            m1, m2, m3, m4, m5 = st.columns(5)
            # fewer is the point: a reduction is drawn green ("inverse"), not as a red loss
            m1.metric("MACs", amount(predicted["macs"]), f"-{predicted['macs_reduction']:.1%}", delta_color="inverse")
            if latency is not None:
                m2.metric("Predicted latency", f"{latency['latency_ms']:.1f} ms", f"-{latency['latency_reduction']:.1%}",
                          delta_color="inverse", help=f"{engine_label}, 1 thread, batch 1, from this machine's latency "
                                                      "table (each layer timed over a grid of channel counts)")
            else:
                m2.metric("Predicted latency", "not measured", help="Measure this machine's latency table below")
            m3.metric("Parameters", amount(predicted["params"]), f"-{predicted['params_reduction']:.1%}",
                      delta_color="inverse")
            m4.metric("Size (float32)", f"{predicted['params'] * 4 / 2**20:.1f} MiB")
            m5.metric("Answered in", f"{elapsed_ms:.0f} ms")
            l1, l2 = st.columns([1, 2])
            l1.radio("Latency engine", list(LATENCY_ENGINES), horizontal=True, key="importance_latency_engine")
            if timed is None and l2.button(f"Measure the latency table ({engine_label}, 1 thread)",
                                           key="importance_latency_measure",
                                           help="Times each layer of this model over a grid of channel counts on this "
                                                "machine (seconds to a minute; cached for later runs and prune jobs)"):
                bar = st.progress(0.0, text="Measuring the latency table...")
                measure_latency_model(graph, engine, 1, lambda fraction, message: bar.progress(
                    min(max(fraction, 0.0), 1.0), text=message) and False)
                st.rerun()
            if not live.budget_met:
                st.warning("The per-layer limits (at most 90% of a layer, at least 2 channels, the layer the classifier "
                           "reads kept whole) cannot reach this target.")
            share = groups.assign(keep=[kept[g] / c for g, c in zip(groups["group"], groups["channels"])])
            st.plotly_chart(layer_bars(share, "keep", range_y=[0, 1], pattern_shape="role",
                                       title=f"Share of channels kept per layer ({allocator})"), width="stretch")
        if kept is not None and st.button("Prune with this allocation", key="importance_prune",
                                          help="Launch a prune run whose first round cuts exactly these channel counts "
                                               "and is kept whatever its drop (the Prune page's default settings "
                                               "otherwise), and follow it there."):
            with error_box("Launching a run with this allocation"):
                launch_with(FixedAllocation(
                    kept=kept, channels={g: int(c) for g, c in zip(groups["group"], groups["channels"])},
                    allocator=allocator_name, target=float(target), checkpoint=checkpoint,
                    overrides={name: count for name, count in kept.items() if count != live.kept[name]}))

    st.markdown("#### Live preview")
    st.caption("Prunes a copy at this setting (group L1 within each layer, no fine-tuning) and shows its masks "
               "beside the unpruned model's. Fine-tuning on the Prune page recovers most of what is lost here.")
    if kept is None:
        st.caption("Choose an allocator with an answer above to preview it.")
    elif st.button("Preview this setting", key="importance_preview"):
        with error_box("Previewing"):
            spec = loaded.spec
            index = dataset_index(current_dataset())
            val = SegmentationDataset(index, "val", tuple(spec.input_size), spec.in_channels, limit=3,
                                      normalisation=spec.normalisation)
            preview = preview_pruned(loaded.model, spec.input_size, spec.in_channels, kept, val)
            image_grid(preview.pictures, preview.captions, columns=3)
            st.caption(f"Pruned and predicted in {preview.seconds:.1f} s.")


live_tuning()
