"""Filter correlation: one layer's filters, which of them stand in for each other, and which
ones plain L1 and the collaborative method would remove."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core.data.dataset import SegmentationDataset
from core.importance.inspect import GroupMeasurement, measure_group, score_group
from core.importance.substitutability import CORRELATION_SOURCES
from core.pruning.loop import calibration_batches
from ui.state import current_cost_model, current_dataset, dataset_index, error_box, require_model, weights_mtime
from ui.widgets import load_style

load_style()
st.title("Filter correlation")
st.caption("Filters whose responses correlate can stand in for each other: the method scores a filter by its "
           "contribution (L1) discounted by how replaceable it is, and removes them one at a time.")

# Correlations come from this many training images, in batches of this size, chosen with this seed.
CALIBRATION = (16, 8, 0)


@st.cache_data(show_spinner="Measuring filter correlations on training images...", max_entries=32)
def measured(path: str, mtime: float, group_name: str, source: str, dataset_key: tuple, calibration: tuple,
             _model, _graph, _index) -> GroupMeasurement:
    """The forward passes, once per checkpoint version, layer, dataset and calibration
    setting (the underscored objects are not hashed: the arguments before them name them).
    Moving beta or the count of filters only rescores this."""
    if source != "activations":  # from the weights alone: no dataset, no calibration
        return measure_group(_model.model, _graph, group_name, [], source=source)
    count, batch_size, seed = calibration
    spec = _model.spec
    train = SegmentationDataset(_index, "train", tuple(spec.input_size), spec.in_channels)
    batches = [x for x, _ in calibration_batches(train, count, batch_size, seed=seed)]
    return measure_group(_model.model, _graph, group_name, batches, seed=seed, source=source)


loaded = require_model()
graph, _cost = current_cost_model()
spec = loaded.spec

c1, c2, c3 = st.columns([2, 1, 1])
names = [g.name for g in graph.groups]
group_name = c1.selectbox("Layer (prunable group, network order)", names,
                          format_func=lambda n: f"{n} (stride {graph.by_name[n].scale}, {graph.by_name[n].channels} filters)",
                          key="correlation_group")
beta = c2.slider("beta (weight of substitutability)", 0.0, 1.0, 0.5, 0.05, key="correlation_beta")
channels = graph.by_name[group_name].channels
remove = c3.slider("Filters to remove", 1, max(1, channels - 1), max(1, channels // 2), key="correlation_remove")
source = st.radio("Correlation from", list(CORRELATION_SOURCES), format_func=CORRELATION_SOURCES.get,
                  horizontal=True, key="correlation_source",
                  help="The method correlates the filters' responses on training images; the weight cosine needs "
                       "no data and ignores what the filters do to it (an approximation).")

analysis = None
with error_box("Measuring correlations"):
    index, dataset_key, calibration = None, None, None
    if source == "activations":
        choice = current_dataset()
        index = dataset_index(choice)  # checked on every run: a vanished folder says so
        dataset_key, calibration = (choice.format, choice.root, choice.seed, choice.options), CALIBRATION
    path = st.session_state["model"]
    measurement = measured(path, weights_mtime(path), group_name, source, dataset_key, calibration,
                           loaded, graph, index)
    analysis = score_group(measurement, graph.by_name[group_name], beta=beta, remove=remove)
if analysis is None:
    st.stop()

order = analysis.clustered_order
labels = [f"f{i}" for i in order]
heat = go.Figure(go.Heatmap(z=analysis.abs_correlation[order][:, order], x=labels, y=labels, zmin=0, zmax=1,
                            colorscale="Viridis", colorbar={"title": "|R|"}))
collaborative = set(analysis.removed_collaborative)
heat.add_trace(go.Scatter(x=[f"f{i}" for i in order if i in collaborative],
                          y=[f"f{i}" for i in order if i in collaborative], mode="markers",
                          marker={"symbol": "x", "color": "#e63946", "size": 9}, name="removed (collaborative)"))
heat.update_layout(title=f"|correlation| ({CORRELATION_SOURCES[source]}), clustered order "
                         "(x: removed by the method)",
                   yaxis_autorange="reversed", height=520)
st.plotly_chart(heat, width="stretch")

frame = pd.DataFrame({
    "filter": labels,
    "contribution (L1)": analysis.contribution[order],
    "combined score S": analysis.combined[order],
    "substitutability s": analysis.substitutability[order],
    "L1 removes": [i in set(analysis.removed_l1) for i in order],
    "collaborative removes": [i in collaborative for i in order],
})
c1, c2 = st.columns(2)
c1.plotly_chart(px.bar(frame, x="filter", y="contribution (L1)", color="L1 removes",
                       color_discrete_map={True: "#e63946", False: "#457b9d"},
                       title="L1 contribution (removed by plain L1 in red)"), width="stretch")
c2.plotly_chart(px.bar(frame, x="filter", y="combined score S", color="collaborative removes",
                       color_discrete_map={True: "#e63946", False: "#2a9d8f"},
                       title=f"Combined score S = c(1 - {beta:g} s) (removed by the method in red)"), width="stretch")
m1, m2, m3 = st.columns(3)
m1.metric("Removed by L1 only", len(set(analysis.removed_l1) - collaborative))
m2.metric("Removed by the method only", len(collaborative - set(analysis.removed_l1)))
m3.metric("Removed by both", analysis.overlap)
where = (f"{CALIBRATION[0]} training images of {current_dataset().label}" if source == "activations"
         else "the filters' weights (cosine; no images read)")
st.caption(f"Correlations from {where}; the method recomputes s "
           "after each removal, so of two filters that duplicate each other it keeps one.")
