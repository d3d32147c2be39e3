"""Filter correlation: one layer's filters, which of them stand in for each other, and which
ones plain L1 and the collaborative method would remove."""

from __future__ import annotations

import numpy as np
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
    train = SegmentationDataset(_index, "train", tuple(spec.input_size), spec.in_channels,
                                normalisation=spec.normalisation)
    batches = [x for x, _ in calibration_batches(train, count, batch_size, seed=seed)]
    return measure_group(_model.model, _graph, group_name, batches, seed=seed, source=source)


loaded = require_model()
graph, _cost = current_cost_model()
spec = loaded.spec

@st.fragment
def inspect_layer() -> None:
    """The layer, beta, count and source choices and all they answer: a fragment, so moving
    beta reruns this alone, not the page's frame (the 300 ms a slider move may take)."""
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

    # Above this many filters the heatmap shows blocks of filters (the largest |R| in each block):
    # a 512-filter matrix is 262,144 cells (3.5 MB sent on every slider move) for a 520-pixel chart.
    HEATMAP_CELLS = 128
    # Above this many filters the bar charts name no filter on the axis (the hover still does).
    NAMED_TICKS = 64
    REMOVED, KEPT_L1, KEPT_METHOD = "#e63946", "#457b9d", "#2a9d8f"


    def block_max(matrix: np.ndarray, block: int) -> np.ndarray:
        """The largest entry of every ``block`` x ``block`` tile (the last tile may be smaller)."""
        n = matrix.shape[0]
        starts = np.arange(0, n, block)
        rows = np.maximum.reduceat(matrix, starts, axis=0)
        return np.maximum.reduceat(rows, starts, axis=1)


    order = analysis.clustered_order
    labels = [f"f{i}" for i in order]
    position = np.arange(len(order))  # a filter's place in the clustered order: the charts' x
    block = max(1, int(np.ceil(len(order) / HEATMAP_CELLS)))
    shown = analysis.abs_correlation[order][:, order]
    if block > 1:
        shown = block_max(shown, block)
    # blocks drawn at their centres, in filter positions: markers and bars share the axis
    heat = go.Figure(go.Heatmap(z=shown.astype(np.float32), x0=(block - 1) / 2, dx=block, y0=(block - 1) / 2, dy=block,
                                zmin=0, zmax=1, colorscale="Viridis", colorbar={"title": "|R|"},
                                hovertemplate=("filters at %{x:.0f}, %{y:.0f} (clustered order)" if block == 1 else
                                               f"blocks of {block} filters around %{{x:.0f}}, %{{y:.0f}}")
                                + "<br>|R| %{z:.2f}<extra></extra>"))
    collaborative = set(analysis.removed_collaborative)
    cut = [p for p, i in zip(position, order) if i in collaborative]
    heat.add_trace(go.Scatter(x=cut, y=cut, mode="markers", text=[labels[p] for p in cut],
                              hovertemplate="%{text}: removed by the method<extra></extra>",
                              marker={"symbol": "x", "color": REMOVED, "size": 9 if len(order) <= NAMED_TICKS else 5},
                              name="removed (collaborative)"))
    blocks = f"; each cell the largest |R| in a block of {block} x {block} filters" if block > 1 else ""
    heat.update_layout(title=f"|correlation| ({CORRELATION_SOURCES[source]}), clustered order "
                             f"(x: removed by the method{blocks})",
                       xaxis_title="filter (clustered order)", yaxis_title="filter",
                       yaxis_autorange="reversed", height=520, legend={"orientation": "h", "y": -0.15})
    if len(order) <= NAMED_TICKS:  # few enough to name every filter
        heat.update_xaxes(tickmode="array", tickvals=position, ticktext=labels)
        heat.update_yaxes(tickmode="array", tickvals=position, ticktext=labels)
    st.plotly_chart(heat, width="stretch")


    def score_bars(values: np.ndarray, removed: set[int], kept_colour: str, title: str, axis: str) -> go.Figure:
        """One bar per filter in the heatmap's clustered order (the same order on both charts),
        red where the method named in the title removes it."""
        figure = go.Figure(go.Bar(
            x=position, y=values[order], text=labels, marker_color=[REMOVED if i in removed else kept_colour for i in order],
            hovertemplate="%{text}: %{y:.3f}<extra></extra>", textposition="none"))
        ticks = {"tickmode": "array", "tickvals": position, "ticktext": labels} if len(order) <= NAMED_TICKS else {}
        figure.update_layout(title=title, xaxis={"title": "filter (clustered order, as in the heatmap)", **ticks},
                             yaxis_title=axis, bargap=0.1 if len(order) <= NAMED_TICKS else 0)
        return figure


    c1, c2 = st.columns(2)
    c1.plotly_chart(score_bars(analysis.contribution, set(analysis.removed_l1), KEPT_L1,
                               "L1 contribution (removed by plain L1 in red)", "contribution c (min-max L1)"),
                    width="stretch")
    c2.plotly_chart(score_bars(analysis.combined, collaborative, KEPT_METHOD,
                               f"Combined score S = c(1 - {beta:g} s) (removed by the method in red)", "combined score S"),
                    width="stretch")
    m1, m2, m3 = st.columns(3)
    m1.metric("Removed by L1 only", len(set(analysis.removed_l1) - collaborative))
    m2.metric("Removed by the method only", len(collaborative - set(analysis.removed_l1)))
    m3.metric("Removed by both", analysis.overlap)
    where = (f"{CALIBRATION[0]} training images of {current_dataset().label}" if source == "activations"
             else "the filters' weights (cosine; no images read)")
    st.caption(f"Correlations from {where}; the method recomputes s "
               "after each removal, so of two filters that duplicate each other it keeps one.")


inspect_layer()
