"""Layer importance: what the scoring network thinks of each layer and scale, and live tuning
of the pruning ratios (allocation, MACs, parameters and size answer from the closed-form cost
model without pruning anything)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st
import torch

from core.allocation.baselines import allocate_global, allocate_uniform
from core.allocation.scoring_network import allocation_from_logits
from core.importance.criteria import ContributionImportance
from core.data.dataset import SegmentationDataset, normalise
from core.pruning.step import pruned_copy
from core.runs import api
from core.visual import overlay_mask
from ui.state import current_cost_model, current_dataset, dataset_index, error_box, require_model
from ui.widgets import image_grid, load_style

load_style()
st.title("Layer importance")
st.caption("Importance per layer and per scale from the scoring network, and live pruning-ratio tuning.")

loaded = require_model()
checkpoint = st.session_state["model"]
graph, cost = current_cost_model()
groups = pd.DataFrame([{"group": g.name, "index": g.index, "scale": f"stride {g.scale}", "role": g.role,
                        "channels": g.channels} for g in graph.groups])


@st.cache_data(show_spinner=False)
def l1_scores(path: str, mtime: float) -> dict[str, np.ndarray]:
    importance = ContributionImportance()
    return {g.name: importance.contribution(graph.tp_group(g, range(g.channels))) for g in graph.groups}


def score_result(job_id: int) -> dict | None:
    job = api.get_job(job_id)
    if job.state != "succeeded" or not job.result:
        return None
    return json.loads(Path(job.result["scores"]).read_text())


@st.fragment(run_every=2.0)
def scoring_progress(job_id: int) -> None:
    job = api.get_job(job_id)
    if job.state in ("queued", "running"):
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"Scoring network, job {job.id}: {job.message}")
    elif job.state == "failed":
        st.error(f"The scoring network failed: {job.error}")
    elif job.state == "succeeded" and not st.session_state.get("scores_shown") == job_id:
        st.session_state["scores_shown"] = job_id
        st.rerun()


st.markdown("#### The scoring network")
if st.button("Run the scoring network (background job)", key="importance_run"):
    with error_box("Starting the scoring network"):
        job = api.submit("score", {"checkpoint": checkpoint, "method": "collaborative", "target": 0.8})
        api.ensure_worker()
        st.session_state["score_job"] = job.id
score_job = st.session_state.get("score_job")
scores = None
if score_job:
    with error_box("Reading the scoring job"):
        scoring_progress(int(score_job))
        scores = score_result(int(score_job))
if scores:
    allocation = scores["allocation"]
    frame = groups.assign(importance=[allocation["group_importance"][g] for g in groups["group"]])
    st.plotly_chart(px.bar(frame, x="group", y="importance", color="scale", pattern_shape="role",
                           title="Importance per layer (keep ratio at 80% fewer MACs), network order"),
                    width="stretch")
    per_scale = pd.DataFrame({"scale": [f"stride {s}" for s in allocation["scale_importance"]],
                              "importance": list(allocation["scale_importance"].values())})
    c1, c2 = st.columns(2)
    c1.plotly_chart(px.bar(per_scale, x="scale", y="importance", title="Importance per scale (MACs-weighted)"),
                    width="stretch")
    if allocation.get("class_importance"):
        matrix = pd.DataFrame(allocation["class_importance"]).T.loc[list(groups["group"])]
        c2.plotly_chart(px.imshow(matrix.T, aspect="auto", color_continuous_scale="RdBu", zmin=-1, zmax=1,
                                  title="Layer x defect-class importance"), width="stretch")
else:
    st.info("Run the scoring network to see which layers and scales matter for this dataset's defects "
            "(a few minutes on a CPU). Uniform and global allocations below work without it.")

st.markdown("#### Live pruning-ratio tuning")
c1, c2 = st.columns(2)
target = c1.slider("Fewer MACs", 0.05, 0.95, 0.8, 0.05, key="importance_target")
allocators = ["uniform", "global (L1)"] + (["scoring network"] if scores else [])
allocator = c2.radio("Allocator", allocators, horizontal=True, key="importance_allocator")
with error_box("Allocating"):
    start = time.perf_counter()
    if allocator == "uniform":
        live = allocate_uniform(graph, cost, target)
    elif allocator == "global (L1)":
        live = allocate_global(graph, cost, l1_scores(checkpoint, Path(checkpoint).stat().st_mtime), target)
    else:
        live = allocation_from_logits(graph, cost, scores["details"]["logits"], target)
    kept = dict(live.kept)
    with st.expander("Per-layer overrides"):
        st.caption("Type a channel count to keep for any layer; the totals follow at once.")
        table = groups.assign(kept=[kept[g] for g in groups["group"]])[["group", "scale", "channels", "kept"]]
        edited = st.data_editor(table, disabled=["group", "scale", "channels"], hide_index=True,
                                key="importance_overrides")
        for name, channels, value in zip(edited["group"], edited["channels"], edited["kept"]):
            kept[name] = int(min(max(int(value), 1), int(channels)))
    predicted = cost.predict(kept)
    elapsed_ms = (time.perf_counter() - start) * 1000
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("MACs", f"{predicted['macs'] / 1e6:.1f} M", f"-{predicted['macs_reduction']:.1%}")
    m2.metric("Parameters", f"{predicted['params'] / 1e6:.2f} M", f"-{predicted['params_reduction']:.1%}")
    m3.metric("Size (float32)", f"{predicted['params'] * 4 / 2**20:.1f} MiB")
    m4.metric("Answered in", f"{elapsed_ms:.0f} ms")
    if not live.budget_met:
        st.warning("The per-layer limits (at most 90% of a layer, at least 2 channels) cannot reach this target.")
    share = groups.assign(keep=[kept[g] / c for g, c in zip(groups["group"], groups["channels"])])
    st.plotly_chart(px.bar(share, x="group", y="keep", color="scale", range_y=[0, 1],
                           title=f"Share of channels kept per layer ({allocator})"), width="stretch")

st.markdown("#### Live preview")
st.caption("Prunes a copy at this setting (group L1 within each layer, no fine-tuning) and shows its masks "
           "beside the unpruned model's. Fine-tuning on the Prune page recovers most of what is lost here.")
if st.button("Preview this setting", key="importance_preview"):
    with error_box("Previewing"):
        spec = loaded.spec
        index = dataset_index(current_dataset())
        val = SegmentationDataset(index, "val", tuple(spec.input_size), spec.in_channels, limit=3)
        start = time.perf_counter()
        pruned = pruned_copy(loaded.model, spec.input_size, spec.in_channels, kept)
        pictures, captions = [], []
        with torch.no_grad():
            for i in range(len(val)):
                image, truth = val.raw(i)
                x = normalise(image, spec.in_channels)[None]
                for label, net in (("unpruned", loaded.model), ("pruned copy", pruned)):
                    pictures.append(overlay_mask(image, net(x).argmax(1)[0].numpy().astype("uint8")))
                    captions.append(f"{label} {i + 1}")
                pictures.append(overlay_mask(image, truth))
                captions.append(f"ground truth {i + 1}")
        image_grid(pictures, captions, columns=3)
        st.caption(f"Pruned and predicted in {time.perf_counter() - start:.1f} s.")
